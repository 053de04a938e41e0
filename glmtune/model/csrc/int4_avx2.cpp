// Int4-weight x int8-activation matrix product for x86 CPUs with AVX2 (see glmtune/model/native.py).
//
// Weights stay in the official ChatGLM2 int4 layout (int8 [N, K/2], byte j of a row holds column 2j in
// its high nibble and column 2j+1 in its low one, signed nibbles) with one fp16 scale per row. The
// activation rows are quantized per block of 32 to int8 with an fp32 scale (absmax / 127), as ggml's
// q8_0 does. A block's dot product is then integer: nibble + 8 (0..15, unsigned) times the int8
// activation with _mm256_maddubs_epi16, pairs summed to int32, and the +8 taken back out with the block's
// activation sum. The result is converted to float once per block. Rows of the weight are split over
// torch's intra-op threads.

#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 32;

// One activation row -> int8 blocks, the 16 even columns of a block first, then the 16 odd ones (so they
// line up with the high and low nibbles of the block's 16 weight bytes), a scale and a sum per block.
void quantize_row(const float* x, int64_t k, int8_t* q, float* scale, float* offset) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    const float inv = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    int8_t* qb = q + b * kBlock;
    for (int i = 0; i < kBlock / 2; ++i) {
      const int32_t even = static_cast<int32_t>(std::nearbyint(xb[2 * i] * inv));
      const int32_t odd = static_cast<int32_t>(std::nearbyint(xb[2 * i + 1] * inv));
      qb[i] = static_cast<int8_t>(even);
      qb[kBlock / 2 + i] = static_cast<int8_t>(odd);
      sum += even + odd;
    }
    scale[b] = d;
    offset[b] = 8.f * d * static_cast<float>(sum);  // what the +8 on every nibble added
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dot products of weight rows r and r+1 with one quantized activation row (two rows share each load of
// the activation block).
inline void dot2(const uint8_t* w0, const uint8_t* w1, const int8_t* q, const float* scale, int64_t blocks,
                 float* out0, float* out1) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(0x08);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
    const __m256 d = _mm256_set1_ps(scale[b]);
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + b * (kBlock / 2)));
    const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w1 + b * (kBlock / 2)));
    // high nibbles (even columns) in the low half, low nibbles (odd columns) in the high half; xor 8
    // turns a 4-bit two's complement value v into v + 8.
    const __m256i u0 = _mm256_xor_si256(
        _mm256_set_m128i(_mm_and_si128(b0, low_mask), _mm_and_si128(_mm_srli_epi16(b0, 4), low_mask)), flip);
    const __m256i u1 = _mm256_xor_si256(
        _mm256_set_m128i(_mm_and_si128(b1, low_mask), _mm_and_si128(_mm_srli_epi16(b1, 4), low_mask)), flip);
    const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, xq), ones);
    const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, xq), ones);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d, acc1);
  }
  *out0 = hsum(acc0);
  *out1 = hsum(acc1);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scale.dim() == 1, "int4_mm: x [M, K], weight [N, K/2], scale [N]");
  TORCH_CHECK(weight.scalar_type() == at::kChar || weight.scalar_type() == at::kByte, "int4_mm: weight must be int8");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(k % kBlock == 0 && weight.size(1) * 2 == k, "int4_mm: K must be a multiple of 32 and match the weight");
  TORCH_CHECK(n % 2 == 0 && scale.size(0) == n, "int4_mm: N must be even and match the scale");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const int64_t blocks = k / kBlock;
  at::Tensor xq = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m, blocks}, x.options().dtype(at::kFloat));
  at::Tensor xo = at::empty({m, blocks}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sp = xs.data_ptr<float>();
  float* op = xo.data_ptr<float>();
  at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * k, k, qp + r * k, sp + r * blocks, op + r * blocks);
  });
  std::vector<float> offsets(m);
  for (int64_t r = 0; r < m; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b) total += op[r * blocks + b];
    offsets[r] = total;
  }
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const float* rs = s.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  // Pairs of weight rows per task; 64 rows (64 KB at K = 4096) is enough work to amortize a task.
  at::parallel_for(0, n / 2, 32, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = 2 * p;
      const uint8_t* w0 = wp + r * (k / 2);
      for (int64_t i = 0; i < m; ++i) {
        float d0, d1;
        dot2(w0, w0 + k / 2, qp + i * k, sp + i * blocks, blocks, &d0, &d1);
        yp[i * n + r] = (d0 - offsets[i]) * rs[r];
        yp[i * n + r + 1] = (d1 - offsets[i]) * rs[r + 1];
      }
    }
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(glmtune_native, lib) {
  lib.def("int4_mm(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(glmtune_native, CPU, lib) {
  lib.impl("int4_mm", &int4_mm);
}
