"""Weight-only int8 / int4 quantization of the frozen ChatGLM2 linear layers (official scheme and layout).

Reproduces THUDM/chatglm2-6b `quantization.py`: per output row, scale = absmax / (2**(bits-1) - 1)
stored as fp16, q = round(w / scale) as int8; int4 packs two values a byte along the input dimension,
even column in the high nibble. State-dict names are the official `*.weight` (int8) and
`*.weight_scale` (fp16), so official int4/int8 checkpoints load as they are and ours load there.

`QuantizedLinear` keeps one copy of the weight and computes with one of two paths:

* exact: dequantize (q * scale in the activation dtype) then matmul, row block by row block. This is
  what the official fp32 outputs are (the golden int4/int8 logits match it within 1e-4, the tolerance
  tests/test_quantization.py checks);
* kernel: torch's CPU weight-only kernels (`_weight_int8pack_mm` on the official int8 layout,
  `_weight_int4pack_mm_for_cpu` after a one-time lossless repack, see `glmtune.model.qkernels`). In fp32 they
  form the same products as the exact path (only the summation order differs) but are scalar loops;
  with bf16 activations they are vectorised, 5-20x faster than dequantizing for a few tokens (the
  scale is then rounded to bf16).

* native (int4 only, x86 with AVX2, once built): glmtune's int4 x int8 kernel (`glmtune.model.native`) on
  the official layout as it is; activations rounded to int8 per block of 32, ~5e-3 relative error,
  the same order as bf16's. On AVX2-only CPUs torch's int4 kernel is compute-bound (bench/README.md).

`mode="auto"` (default) picks per call from bits, activation dtype and row count (`AUTO_KERNEL_MAX_ROWS`,
measured by bench/quant.py): fp32 and fp16 always run exact, bf16 runs the kernels up to 32 (int8) /
128 (int4) rows, i.e. decoding and short prompts; for int4 with bf16 activations the native kernel
takes the place of torch's where it is built (up to `NATIVE_MAX_ROWS`, exact above). "exact",
"kernel", "native" and "bf16" (fp32/fp16 activations cast to bf16 for torch's kernels: fastest, least
exact) force a path ("native" where it cannot run: what auto would pick). CUDA always uses the exact
path (no cpm_kernels).

The backward pass gives the input gradient (a P-tuning prefix trains through the frozen model) from
column blocks of the integer weight, so no full dequantized or transposed weight is ever kept.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glmtune import compat
from glmtune.model import cpu_linear, native, qkernels
from glmtune.errors import GlmtuneError
from glmtune.fsutil import atomic_dir

MODES = ("auto", "exact", "kernel", "bf16", "native")
# auto mode: the kernels run when a call has at most this many rows (tokens), per (bits, dtype);
# crossovers measured at the 6B shapes by bench/quant.py (section "crossover", AVX512 CPU, 1 and 2
# threads). The bf16 kernels are vectorised: int4 beats dequantize + BLAS up to ~128 rows, int8 up to
# 16-64. The fp32/fp16 ones are scalar loops, slower than the exact path even for one token.
# The 64-token prompt of `bench/quant.py --decode-6b` was re-measured per 6B shape (1 thread, bf16,
# ms, kernel vs exact with the weight in the official / the kernel layout, which is where it is
# after the first decoding step): gate_up 187 vs 296 / 385, down 93 vs 101 / 155, o 22 vs 25 / 33,
# k/v 1.2 vs 1.0 / 1.5; at 128 rows they tie (480 vs 401 / 526, 162 vs 152 / 208, 47 vs 44 / 40).
# So the kernel stays the faster path for a 64-row prompt at every shape, and one threshold serves
# them all; the slow 6B prompt was the output layer's weight copy (see modeling.py), not this.
AUTO_KERNEL_MAX_ROWS = {
    (8, torch.bfloat16): 32, (4, torch.bfloat16): 128,
    (8, torch.float32): 0, (4, torch.float32): 0,
    (8, torch.float16): 0, (4, torch.float16): 0,
}
# auto mode with bf16 activations, int4, where glmtune's AVX2 kernel is built (glmtune.model.native): it
# runs up to this many rows, the exact path above (torch's int4 kernel is then never used, so the
# weight keeps the official layout). Measured by bench/quant.py (section "native") on the 2-core AVX2
# EPYC: at 64 and 128 rows it took 0.31-0.57x the exact path's time at the gate/up and down shapes.
NATIVE_MAX_ROWS = 128
# Dequantized blocks stay under this many elements (16 MB in fp32) in the exact path and backward.
CHUNK_ELEMENTS = 1 << 22

# The six linear kinds of every decoder layer: native GlmForCausalLM names and official ChatGLM2 ones.
DECODER_LINEAR = re.compile(
    r"(?:^|\.)layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate_up|down)_proj"
    r"|self_attention\.(?:query_key_value|dense)|mlp\.(?:dense_h_to_4h|dense_4h_to_h))$"
)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise GlmtuneError(f"quantization bits: expected 4 or 8, found {bits!r}")


def _check_width(in_features: int, bits: int) -> None:
    if bits == 4 and in_features % 2:
        raise GlmtuneError(f"int4 packs two input columns a byte: input width must be even, found {in_features}")


def is_quantizable_key(key: str) -> bool:
    """Whether a state-dict key is the weight of a decoder-layer linear (official or native name)."""
    return key.endswith(".weight") and bool(DECODER_LINEAR.search(key[: -len(".weight")]))


# --- tensors -----------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official quantization of a [out, in] weight -> (int8 [out, in] or packed [out, in/2], fp16 scale [out]).

    The arithmetic is the official one, in the weight's own dtype: absmax / qmax computed in that dtype
    and rounded to fp16, then w / scale with torch's type promotion (fp32 weights divide in fp32 by the
    fp16 scale; fp16 weights divide in fp16, as `model.half().quantize(bits)` did). Quantizing the
    golden fp32 weights this way reproduces the golden int8/int4 tensors bit for bit. Rows are
    processed in blocks so no full-size temporary is made; all-zero rows get q = 0 (the official code
    would divide 0 by 0).
    """
    _check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise GlmtuneError(
            f"quantize_weight: expected a 2-D floating weight, found {weight.dtype} {tuple(weight.shape)}"
        )
    n, k = weight.shape
    _check_width(k, bits)
    qmax = 2 ** (bits - 1) - 1
    weight = weight.detach()
    scale = torch.empty(n, dtype=torch.float16, device=weight.device)
    out = torch.empty(n, k if bits == 8 else k // 2, dtype=torch.int8, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, n, step):
        w = weight[r0: r0 + step]
        s = (w.abs().amax(dim=-1) / qmax).half()
        if not torch.isfinite(s).all():
            raise GlmtuneError("quantize_weight: weight has non-finite values or values too large for an fp16 scale")
        scale[r0: r0 + step] = s
        safe = torch.where(s == 0, torch.ones_like(s), s)
        # The clamp never binds (the fp16 scale is within 2**-11 of absmax/qmax); it only guards the cast.
        q = torch.round(w / safe[:, None]).clamp_(-qmax, qmax).to(torch.int8)
        out[r0: r0 + step] = q if bits == 8 else qkernels.pack_int4(q)
    return out, scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """Official-layout int8/int4 weight + fp16 scale -> [out, in] weight in `dtype` (q * scale in `dtype`)."""
    _check_bits(bits)
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != (qweight.shape[0],):
        raise GlmtuneError(
            f"dequantize_weight: expected int8 [out, in{'/2' if bits == 4 else ''}] and scale [out], "
            f"found {qweight.dtype} {tuple(qweight.shape)} and {tuple(scale.shape)}"
        )
    q = qweight.to(dtype) if bits == 8 else qkernels.unpack_int4(qweight, dtype)
    return q.mul_(scale.to(dtype)[:, None])


# --- module ------------------------------------------------------------------------------------


class _QuantizedMatmul(torch.autograd.Function):
    """y = x @ W^T + b with W frozen and quantized; backward gives dx (and db if asked), never dW."""

    @staticmethod
    def forward(ctx, x, bias, layer, path):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return layer._matmul(x, bias, path)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad_x = ctx.layer._grad_input(grad) if ctx.needs_input_grad[0] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None, None


class QuantizedLinear(compat.ModuleStateHooks, nn.Module):
    """A frozen linear layer with an int8 or int4 weight in the official ChatGLM2 layout.

    Buffers `weight` (int8 [out, in] or [out, in/2]) and `weight_scale` (fp16 [out]); optional frozen
    `bias` in `dtype`. On CPU the int4 weight is repacked once, in place, into torch's kernel layout
    (uint8) the first time a kernel runs; `state_dict()` and device moves give the official layout back.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        _check_bits(bits)
        _check_width(in_features, bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.mode = "auto"
        width = in_features if bits == 8 else in_features // 2
        self.register_buffer("weight", torch.empty(out_features, width, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_scale: tuple[torch.dtype, torch.Tensor] | None = None
        self._kernel_supported: bool | None = None
        self._native_supported: bool | None = None
        self._kernel_pad = qkernels.int4_kernel_width(in_features) - in_features if bits == 4 else 0

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """Quantize an `nn.Linear` (official arithmetic in its weight dtype); the bias is kept as it is."""
        q, scale = quantize_weight(linear.weight, bits)
        module = cls(linear.in_features, linear.out_features, bits, bias=False, device="meta")
        module.weight, module.weight_scale = q, scale
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, mode={self.mode}")

    # -- weight access, whichever layout holds it --

    @property
    def _cpu_layout(self) -> bool:
        return self.weight.dtype == torch.uint8  # torch's CPU int4 kernel layout; int8 = official

    def _chunk(self, length: int, other: int) -> int:
        step = max(64, CHUNK_ELEMENTS // max(other, 1) // 64 * 64)  # multiple of 64: int4 pairs, kernel blocks
        return length if step >= length else step

    def _rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Integer values of rows r0:r1 in `dtype` (unscaled)."""
        if self.bits == 8:
            return self.weight[r0:r1].to(dtype)
        if self._cpu_layout:
            rows = qkernels.cpu_int4_rows(self.weight, qkernels.cpu_int4_layout(), r0, r1)
            return rows[:, : self.in_features].to(dtype)
        return qkernels.unpack_int4(self.weight[r0:r1], dtype)

    def _cols(self, k0: int, k1: int, dtype: torch.dtype) -> torch.Tensor:
        """Integer values of columns k0:k1 (k0 even) in `dtype` (unscaled)."""
        if self.bits == 8:
            return self.weight[:, k0:k1].to(dtype)
        if self._cpu_layout:
            return qkernels.cpu_int4_cols(self.weight, qkernels.cpu_int4_layout(), k0, k1).to(dtype)
        return qkernels.unpack_int4(self.weight[:, k0 // 2: k1 // 2], dtype)

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return self._rows(r0, r1, dtype).mul_(self.weight_scale[r0:r1].to(dtype)[:, None])

    def official_weight(self) -> torch.Tensor:
        """The weight in the official layout (a fresh tensor only when the CPU kernel layout holds it)."""
        if not self._cpu_layout:
            return self.weight
        chunk = self._chunk(self.out_features, self.in_features)
        return qkernels.cpu_int4_to_official(self.weight, qkernels.cpu_int4_layout(), chunk, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequant_rows(0, self.out_features, dtype)

    def _to_official_layout(self) -> None:
        if self._cpu_layout:
            self.weight = self.official_weight()
        self._kernel_scale = None

    def _to_kernel_layout(self) -> None:
        if self.bits == 4 and not self._cpu_layout:
            # Replace, not add: the module keeps one copy of the weight (the same bytes, plus zero
            # columns up to a multiple of 32 when the input width needs them).
            self.weight = qkernels.official_to_cpu_int4(self.weight, qkernels.cpu_int4_layout(),
                                                        self._chunk(self.out_features, self.in_features))

    # -- keep the official representation at the module's boundaries (torch's save / load / move hooks, which
    #    glmtune.compat.ModuleStateHooks hands to these three methods) --

    def save_state(self, destination, prefix, keep_vars):
        super().save_state(destination, prefix, keep_vars)
        if self._cpu_layout:
            destination[prefix + "weight"] = self.official_weight()

    def load_state(self, state_dict, prefix, *args, **kwargs):
        if self._cpu_layout:
            width = self.in_features // 2
            self.weight = torch.empty(self.out_features, width, dtype=torch.int8, device=self.weight.device)
        self._kernel_scale = None
        super().load_state(state_dict, prefix, *args, **kwargs)

    def apply_to_tensors(self, fn, recurse=True):
        # Device moves see the official layout (the CPU kernel layout means nothing elsewhere), and the
        # scale stays fp16 whatever dtype the model is cast to: it is the official value, and a bf16
        # copy would lose 3 of its bits.
        self._to_official_layout()
        scale = self.weight_scale
        result = super().apply_to_tensors(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return result

    # -- compute --

    def _choose_path(self, x: torch.Tensor, weight: torch.Tensor) -> str:
        mode = self.mode
        if mode not in MODES:
            raise GlmtuneError(f"QuantizedLinear.mode: expected one of {MODES}, found {mode!r}")
        if (mode == "exact" or x.device.type != "cpu" or weight.device.type != "cpu"
                or x.dtype not in qkernels.KERNEL_DTYPES):
            return "exact"
        if mode == "native" or (mode == "auto" and x.dtype == torch.bfloat16):
            if self._native_ok():
                return "native" if mode == "native" or x.shape[0] <= NATIVE_MAX_ROWS else "exact"
            mode = "auto"  # not built or not supported here: what auto picks without it
        if not self._kernel_ok():
            return "exact"
        if mode != "auto":
            return mode
        return "kernel" if x.shape[0] <= AUTO_KERNEL_MAX_ROWS[self.bits, x.dtype] else "exact"

    def _kernel_ok(self) -> bool:
        # Fixed per layer (bits and shape never change), so asked once: a 6B decoding step makes 168
        # calls, and Python per call is a measurable share of a step (bench/quant.py --decode-6b).
        if self._kernel_supported is None:
            self._kernel_supported = qkernels.kernel_supported(self.bits, self.out_features, self.in_features)
        return self._kernel_supported

    def _native_ok(self) -> bool:
        if self._native_supported is None:
            self._native_supported = self.bits == 4 and native.supports(self.out_features, self.in_features)
        return self._native_supported

    def _scale_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self._kernel_scale is None or self._kernel_scale[0] != dtype:
            if self.bits == 8:
                scale = self.weight_scale.to(dtype)
            else:
                width = qkernels.int4_kernel_width(self.in_features)
                scale = qkernels.int4_scales_and_zeros(self.weight_scale, width, dtype)
            self._kernel_scale = (dtype, scale)
        return self._kernel_scale[1]

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        weight = self.weight  # read once: module buffers go through nn.Module.__getattr__
        if self.bits == 8:
            return qkernels.int8_mm(x, weight, self._scale_for(x.dtype))
        if weight.dtype != torch.uint8:
            self._to_kernel_layout()
            weight = self.weight
        if self._kernel_pad:  # the kernel's copy has zero columns up to a multiple of 32
            x = F.pad(x, (0, self._kernel_pad))
        return qkernels.int4_mm(x, weight, self._scale_for(x.dtype))

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None, path: str) -> torch.Tensor:
        b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        if path == "kernel":
            y = self._kernel(x)
            return y if b is None else y.add_(b)
        if path == "native":
            if self._cpu_layout:  # torch's kernel ran before (mode "kernel"): the native one reads the official layout
                self._to_official_layout()
            y = native.int4_mm(x.contiguous(), self.weight, self.weight_scale)
            return y if b is None else y.add_(b)
        if path == "bf16":
            y = self._kernel(x.to(torch.bfloat16)).to(x.dtype)
            return y if b is None else y.add_(b)
        # bf16 on a CPU without bf16 instructions: the dequantized bf16 block widened to fp32 and the
        # product formed there (see glmtune.model.cpu_linear: the same result up to the order of the sum).
        wide = cpu_linear.widen_bf16_products(x)
        xw = x.float() if wide else x
        step = self._chunk(self.out_features, self.in_features)
        outs = []
        for r0 in range(0, self.out_features, step):
            r1 = min(self.out_features, r0 + step)
            w = self._dequant_rows(r0, r1, x.dtype)
            bias_rows = None if b is None else b[r0:r1]
            outs.append(F.linear(xw, w.float(), None if bias_rows is None else bias_rows.float()) if wide
                        else F.linear(xw, w, bias_rows))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.to(x.dtype) if wide else y

    def _grad_input(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ W = (grad * scale) @ q, over column blocks of q so only one block exists at a time.

        Folding the per-row scale into the [tokens, out] gradient instead of the [out, in] weight saves
        a pass over the weight; it only reassociates one product (differences of an ulp)."""
        grad = grad * self.weight_scale.to(grad.dtype)
        wide = cpu_linear.widen_bf16_products(grad)  # as in `_matmul`; the integer values are exact in fp32
        gw = grad.float() if wide else grad
        step = self._chunk(self.in_features, self.out_features)
        if step >= self.in_features:
            out = gw.mm(self._rows(0, self.out_features, gw.dtype))
            return out.to(grad.dtype) if wide else out
        out = torch.empty(grad.shape[0], self.in_features, dtype=grad.dtype, device=grad.device)
        for k0 in range(0, self.in_features, step):
            k1 = min(self.in_features, k0 + step)
            out[:, k0:k1] = gw.mm(self._cols(k0, k1, gw.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"QuantizedLinear: input width {x.shape[-1]}, expected {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        path = self._choose_path(x2, self.weight)
        if torch.is_grad_enabled() and (x2.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            y = _QuantizedMatmul.apply(x2, self.bias, self, path)
        else:
            y = self._matmul(x2, self.bias, path)
        return y.view(*x.shape[:-1], self.out_features)


# --- models and checkpoints --------------------------------------------------------------------


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and DECODER_LINEAR.search(name):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, module))
    if not found:
        raise GlmtuneError("no decoder-layer linear layers (q/k/v/o, gate_up, down) found to quantize")
    return found


def replace_linears_with_quantized(model: nn.Module, bits: int, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap every decoder layer's q/k/v/o, gate_up and down `nn.Linear` for an empty `QuantizedLinear`
    (on the linear's device, meta included) for a quantized state dict to be loaded into. Embeddings,
    norms and lm_head stay as they are. `dtype` is the bias dtype (default: the linear's)."""
    _check_bits(bits)
    for parent, attr, linear in _decoder_linears(model):
        setattr(parent, attr, QuantizedLinear(linear.in_features, linear.out_features, bits, linear.bias is not None,
                                              dtype=dtype or linear.weight.dtype, device=linear.weight.device))
    return model


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Quantize a loaded full-precision model in place, layer by layer (each float weight is freed as
    its quantized copy replaces it)."""
    _check_bits(bits)
    for parent, attr, linear in _decoder_linears(model):
        setattr(parent, attr, QuantizedLinear.from_float(linear, bits))
    return model


def set_quantized_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the compute path ("auto", "exact", "kernel", "bf16") of every QuantizedLinear in `model`."""
    if mode not in MODES:
        raise GlmtuneError(f"quantized compute mode: expected one of {MODES}, found {mode!r}")
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.mode = mode
    return model


def quantize_state_dict_shard(state: dict[str, torch.Tensor], bits: int,
                              key_filter: Callable[[str], bool] = is_quantizable_key) -> dict[str, torch.Tensor]:
    """Quantize the decoder-layer linear weights of one checkpoint shard (official or native names).

    Each selected `X.weight` becomes int8 `X.weight` + fp16 `X.weight_scale`; other tensors pass
    through untouched. Meant for loaders and converters that go shard by shard, so the full-precision
    model never has to be in memory at once.
    """
    _check_bits(bits)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key_filter(key) and tensor.dim() == 2 and tensor.is_floating_point():
            try:
                out[key], out[key + "_scale"] = quantize_weight(tensor, bits)
            except GlmtuneError as exc:
                raise GlmtuneError(f"{key}: {exc}") from None
        else:
            out[key] = tensor
    return out


def quantize_checkpoint(model_path: str | Path, output_dir: str | Path, bits: int, *, force: bool = False,
                        dtype: str = "float16") -> Path:
    """Write an official-layout int8/int4 copy of a full-precision ChatGLM2 folder, shard by shard.

    As the official int4/int8 releases: quantized decoder linears, every other tensor in `dtype`
    (fp16), `quantization_bit` in config.json; tokenizer files are copied (never `*.py` code).
    Weights are written as safetensors, one output shard per input shard, into a temporary folder
    renamed into place at the end.
    """
    from safetensors.torch import save_file

    from glmtune.fsutil import check_output_dir
    from glmtune.model.weights import iter_shard, parse_dtype, read_chatglm_config, weight_files

    _check_bits(bits)
    src = Path(model_path)
    if not src.is_dir():
        raise GlmtuneError(f"--model-path {src}: model folder not found")
    cfg = read_chatglm_config(src)
    if cfg.get("quantization_bit"):
        raise GlmtuneError(f"{src}/config.json: field quantization_bit: the model is already quantized "
                           f"({cfg['quantization_bit']} bits); expected a full-precision model")
    store = parse_dtype(dtype)
    out = check_output_dir(output_dir, force, src)
    files = weight_files(src)
    with atomic_dir(out) as tmp:
        weight_map, total = {}, 0
        for i, shard in enumerate(files, 1):
            name = "model.safetensors" if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}.safetensors"
            state = quantize_state_dict_shard({k: t for k, t, _ in iter_shard(shard)}, bits)
            state = {k: (v.to(store) if v.is_floating_point() and not k.endswith("_scale") else v).contiguous()
                     for k, v in state.items()}
            save_file(state, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(state, name))
            total += sum(t.numel() * t.element_size() for t in state.values())
            del state  # one shard in memory at a time
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        cfg.update(quantization_bit=bits, torch_dtype=str(store).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        # Tokenizer and other side files travel; weights (also unused duplicates in another format) and code do not.
        skip = {"config.json", "pytorch_model.bin.index.json", "model.safetensors.index.json"}
        for path in src.iterdir():
            if path.is_file() and path.name not in skip and path.suffix not in (".py", ".bin", ".safetensors"):
                shutil.copy2(path, tmp / path.name)
    return out
