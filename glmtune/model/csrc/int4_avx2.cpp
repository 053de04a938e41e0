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

// 16 weight bytes (32 columns) -> 32 unsigned values nibble ^ 8 = v + 8: the bytes are loaded into both
// 128-bit lanes, the low lane shifted right by 4 (high nibbles: even columns), then masked.
inline __m256i unpack_block(const uint8_t* w, __m256i shifts, __m256i mask) {
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_xor_si256(_mm256_and_si256(_mm256_srlv_epi32(both, shifts), mask), _mm256_set1_epi8(0x08));
}

// Dot products of ROWS consecutive weight rows (stride k/2 bytes) with one quantized activation row; the
// rows share each load of the activation block and its scale.
template <int ROWS>
inline void dot_rows(const uint8_t* w, int64_t stride, const int8_t* q, const float* scale, int64_t blocks,
                     float* out) {
  const __m256i shifts = _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
    const __m256 d = _mm256_broadcast_ss(scale + b);
    for (int r = 0; r < ROWS; ++r) {
      const __m256i u = unpack_block(w + r * stride + b * (kBlock / 2), shifts, mask);
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xq), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) out[r] = hsum(acc[r]);
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
  // Four weight rows at a time (N % 4 == 0; otherwise the last rows go two at a time); 64 rows (128 KB at
  // K = 4096) per task is enough work to amortize a task.
  const int64_t stride = k / 2;
  at::parallel_for(0, n / 2, 32, [&](int64_t p0, int64_t p1) {
    float d[4];
    for (int64_t p = p0; p < p1;) {
      const int64_t r = 2 * p;
      const bool four = p + 1 < p1;
      for (int64_t i = 0; i < m; ++i) {
        if (four) {
          dot_rows<4>(wp + r * stride, stride, qp + i * k, sp + i * blocks, blocks, d);
        } else {
          dot_rows<2>(wp + r * stride, stride, qp + i * k, sp + i * blocks, blocks, d);
        }
        for (int j = 0; j < (four ? 4 : 2); ++j) yp[i * n + r + j] = (d[j] - offsets[i]) * rs[r + j];
      }
      p += four ? 2 : 1;
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
