"""Weight-only int8/int4 quantization: official tensors and logits, both compute paths, gradients, layouts."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmtune.model import qkernels
from glmtune.model import quantization as Q
from glmtune.errors import GlmtuneError
from glmtune.model.quantization import (
    QuantizedLinear,
    dequantize_weight,
    is_quantizable_key,
    quantize_checkpoint,
    quantize_state_dict_shard,
    quantize_weight,
    replace_linears_with_quantized,
)

TOL = 1e-4  # the project's golden-logits tolerance (fp32)
LINEAR_KINDS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


@pytest.fixture(scope="module")
def golden(reference):
    root = reference / "golden-model"
    index = json.loads((root / "model" / "pytorch_model.bin.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(torch.load(root / "model" / shard, weights_only=True))
    return root, weights, torch.load(root / "expected.pt", weights_only=True)


def _linear(n_in, n_out, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(n_out, 1) * 4)  # rows of very different ranges
    return layer


# --- official tensors --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_golden_fp32_weights_reproduces_official_int_tensors(golden, bits):
    root, weights, _ = golden
    official = torch.load(root / f"model-int{bits}" / "pytorch_model.bin", weights_only=True)
    ours = quantize_state_dict_shard(weights, bits)
    assert set(ours) == set(official)
    checked = 0
    for key in official:
        if key.endswith(".weight_scale") or is_quantizable_key(key):
            assert ours[key].dtype == official[key].dtype, key
            assert torch.equal(ours[key], official[key]), key
            checked += 1
        else:
            assert ours[key] is weights[key]  # passed through untouched
    assert checked == 2 * 2 * len(LINEAR_KINDS)


def test_int4_packs_even_column_in_high_nibble():
    q = torch.tensor([[1, -2, 7, -7], [-1, 3, -8, 0]], dtype=torch.int8)
    packed = qkernels.pack_int4(q)
    assert packed.tolist() == [[0x1E, 0x79], [0xF3 - 256, 0x80 - 256]]  # high nibble = even column
    assert torch.equal(qkernels.unpack_int4(packed), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weight_is_within_half_a_step_of_the_original(bits):
    w = _linear(96, 48).weight.detach()
    q, scale = quantize_weight(w, bits)
    assert q.shape == (48, 96 if bits == 8 else 48) and q.dtype == torch.int8 and scale.dtype == torch.float16
    err = (dequantize_weight(q, scale, bits) - w).abs()
    assert (err <= scale.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert err.max() > 0  # it is a lossy scheme: the bound above is not vacuous


def test_fp16_weights_divide_in_fp16_as_the_official_half_model_did():
    w = _linear(64, 32).weight.detach().half()
    q, scale = quantize_weight(w, 8)
    assert torch.equal(scale, (w.abs().amax(-1) / 127).half())
    assert torch.equal(q, torch.round(w / scale[:, None]).to(torch.int8))  # fp16 / fp16 stays fp16


def test_all_zero_row_gets_zero_scale_and_zero_values():
    w = torch.randn(4, 8)
    w[2] = 0
    for bits in (8, 4):
        q, scale = quantize_weight(w, bits)
        assert scale[2] == 0 and (q[2] == 0).all()
        assert torch.isfinite(dequantize_weight(q, scale, bits)).all()


def test_bad_bits_odd_int4_width_and_non_finite_weights_are_clear_errors():
    with pytest.raises(GlmtuneError, match="expected 4 or 8, found 3"):
        quantize_weight(torch.randn(4, 8), 3)
    with pytest.raises(GlmtuneError, match="expected 4 or 8"):
        QuantizedLinear(8, 4, 16, bias=False)
    with pytest.raises(GlmtuneError, match="must be even, found 7"):
        quantize_weight(torch.randn(4, 7), 4)
    with pytest.raises(GlmtuneError, match="must be even, found 7"):
        QuantizedLinear(7, 4, 4, bias=False)
    with pytest.raises(GlmtuneError, match="non-finite"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(GlmtuneError, match="layers.0.mlp.down_proj.weight: .*must be even"):
        quantize_state_dict_shard({"model.layers.0.mlp.down_proj.weight": torch.randn(4, 5)}, 4)
    with pytest.raises(GlmtuneError, match="expected int8"):
        dequantize_weight(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3), 8)
    layer = QuantizedLinear.from_float(_linear(32, 16), 8)
    layer.mode = "fastest"
    with pytest.raises(GlmtuneError, match="mode"):
        layer(torch.randn(2, 32))


# --- the module: exact path, kernel path, memory layout ----------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_exact_path_equals_linear_with_the_dequantized_weight(bits):
    float_layer = _linear(128, 96)
    layer = QuantizedLinear.from_float(float_layer, bits)
    layer.mode = "exact"
    x = torch.randn(2, 5, 128)
    w = dequantize_weight(quantize_weight(float_layer.weight, bits)[0], layer.weight_scale, bits)
    assert torch.equal(layer(x), F.linear(x, w, float_layer.bias))


@pytest.mark.parametrize("bits", [8, 4])
def test_exact_path_in_row_blocks_matches_one_block(bits, monkeypatch):
    layer = QuantizedLinear.from_float(_linear(128, 320), bits)
    layer.mode = "exact"
    x = torch.randn(7, 128)
    whole = layer(x)
    monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 64 * 128)  # 5 row blocks of 64
    # Only the BLAS call's shape changes; fp32 summation order may differ in the last bit.
    torch.testing.assert_close(layer(x), whole, rtol=1e-6, atol=1e-6)


needs_kernels = pytest.mark.skipif(
    not (qkernels.cpu_int8_kernel_ok() and qkernels.cpu_int4_layout()),
    reason="torch CPU weight-only kernels unavailable"
)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("width", [256, 80])  # 80: int4 pads its kernel copy to 96 columns
def test_fp32_kernel_path_equals_exact_path_up_to_summation_order(bits, rows, width):
    layer = QuantizedLinear.from_float(_linear(width, 112), bits)  # 112 = a full 64-row block + a 48-row tail
    x = torch.randn(rows, width)
    layer.mode = "exact"
    exact = layer(x)
    layer.mode = "kernel"
    # Same products (q * scale, or scale applied after the sum for int8) in fp32; only the
    # accumulation order differs from BLAS, so relative differences are ~1e-7.
    torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["kernel", "bf16"])
def test_bf16_kernels_are_within_bf16_rounding_of_exact_fp32(bits, mode):
    layer = QuantizedLinear.from_float(_linear(256, 112), bits)
    x = torch.randn(9, 256).bfloat16()
    layer.mode = "exact"
    exact = layer(x.float())  # fp32 product of the same bf16 inputs
    layer.mode = mode
    y = layer(x if mode == "kernel" else x.float())
    assert y.dtype == (torch.bfloat16 if mode == "kernel" else torch.float32)
    # The kernels take the scale in bf16 (rel. error 2**-9) and round the output to bf16 (2**-9);
    # accumulation is fp32. So 2**-7 of the output range bounds every element.
    err = (y.float() - exact).abs().max().item()
    assert err <= 2**-7 * exact.abs().max().item()


@needs_kernels
@pytest.mark.parametrize("width", [256, 80])
def test_int4_kernel_layout_replaces_the_weight_and_state_dict_stays_official(width):
    float_layer = _linear(width, 112)
    layer = QuantizedLinear.from_float(float_layer, 4)
    official = layer.weight.clone()
    layer.mode = "kernel"
    y = layer(torch.randn(3, width))
    assert layer.weight.dtype == torch.uint8  # replaced in place: one copy of the weight
    assert layer.weight.shape == (112, qkernels.int4_kernel_width(width) // 2)
    assert torch.equal(layer.state_dict()["weight"], official)

    fresh = QuantizedLinear(width, 112, 4, bias=True)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight, official)
    layer.load_state_dict(fresh.state_dict())  # loading into the kernel layout goes back to official
    assert torch.equal(layer.weight, official)
    layer(torch.randn(3, width))

    layer.to(torch.bfloat16)  # dtype casts keep the official layout and the fp16 scale
    assert torch.equal(layer.weight, official) and layer.weight_scale.dtype == torch.float16
    assert layer.bias.dtype == torch.bfloat16
    assert y.shape == (3, 112)


@pytest.mark.parametrize("layout", qkernels._CANDIDATES)
@pytest.mark.parametrize("width", [96, 80])  # 80: the kernel copy gets 16 zero columns (width 96)
def test_every_candidate_cpu_int4_layout_round_trips(layout, width):
    q = torch.randint(-7, 8, (176, width), dtype=torch.int8)
    packed = qkernels.official_to_cpu_int4(qkernels.pack_int4(q), layout, chunk_rows=64)
    assert packed.shape == (176, 48)
    assert torch.equal(qkernels.cpu_int4_to_official(packed, layout, chunk_rows=128, k=width), qkernels.pack_int4(q))
    assert torch.equal(qkernels.cpu_int4_rows(packed, layout, 64, 176)[:, :width], q[64:])
    assert (qkernels.cpu_int4_rows(packed, layout, 0, 176)[:, width:] == 0).all()
    assert torch.equal(qkernels.cpu_int4_cols(packed, layout, 6, 50), q[:, 6:50])


LAYOUT_PROBE = """
import torch
from glmtune.model import qkernels
from glmtune.model.quantization import QuantizedLinear
layout = qkernels.cpu_int4_layout()
torch.manual_seed(0)
layer = QuantizedLinear.from_float(torch.nn.Linear(256, 112), 4)
x = torch.randn(5, 256)
layer.mode = "exact"; exact = layer(x)
layer.mode = "kernel"; fast = layer(x)
assert layer.weight.dtype == torch.uint8
print(layout.block_n, layout.split, float((fast - exact).abs().max() / exact.abs().max()))
"""


@needs_kernels
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 CPU capabilities")
@pytest.mark.parametrize(("capability", "expected"), [("avx2", "32 True"), ("default", "32 False")])
def test_int4_layout_of_other_cpu_builds_is_detected_and_computes_right(capability, expected):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", LAYOUT_PROBE], env=env, capture_output=True, text=True, check=True)
    block, split, rel_err = out.stdout.split()
    assert f"{block} {split}" == expected
    assert float(rel_err) < 1e-5


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("chunked", [False, True])
def test_input_gradient_equals_gradient_through_dequantized_fp32_weight(bits, chunked, monkeypatch):
    float_layer = _linear(192, 128)
    layer = QuantizedLinear.from_float(float_layer, bits)
    if chunked:
        monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 64 * 64)  # backward in 3 column blocks
    w = layer.dequantized_weight(torch.float32)
    x = torch.randn(2, 6, 192, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    target = torch.randn(2, 6, 128)
    (layer(x) * target).sum().backward()
    (F.linear(x_ref, w, float_layer.bias.detach()) * target).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None and not layer.bias.requires_grad


@pytest.mark.parametrize("bits", [8, 4])
def test_prefix_gradient_through_quantized_golden_model_equals_dequantized_fp32(golden, bits):
    from glmtune.model.loading import load_model

    root, _, exp = golden
    model = load_model(root / f"model-int{bits}", pre_seq_len=4)
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = nn.Parameter(module.dequantized_weight(torch.float32), requires_grad=False)
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent), attr, dense)
    grads = []
    for m in (model, reference):
        m(input_ids=exp["input_ids"], labels=exp["labels"]).loss.backward()
        grads.append(m.prefix_encoder.embedding.weight.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


# --- whole models ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_official_quantized_golden_models_give_official_logits(golden, bits):
    from glmtune.model.loading import load_model

    root, _, exp = golden
    model = load_model(root / f"model-int{bits}")
    mask = exp["padded_attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=exp["input_ids"]).logits
        padded = model(input_ids=exp["padded_input_ids"], attention_mask=mask,
                       position_ids=exp["padded_position_ids"]).logits
    assert (logits - exp[f"int{bits}/logits"]).abs().max().item() <= TOL
    assert (padded - exp[f"int{bits}/padded_logits"])[mask.bool()].abs().max().item() <= TOL


def test_replace_linears_swaps_the_six_decoder_kinds_only(golden):
    from glmtune.model.loading import load_model

    root, _, _ = golden
    model = replace_linears_with_quantized(load_model(root / "model"), 4, torch.float32)
    quantized = sorted(n.split(".", 3)[-1] for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    per_layer = ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.k_proj", "self_attn.o_proj",
                 "self_attn.q_proj", "self_attn.v_proj"]
    assert quantized == sorted(per_layer * 2)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    with pytest.raises(GlmtuneError, match="no decoder-layer linear"):
        replace_linears_with_quantized(nn.Sequential(nn.Linear(4, 4)), 8)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_command_writes_the_official_quantized_model(golden, tmp_path, bits):
    from glmtune.model.loading import load_model

    root, _, exp = golden
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from glmtune.cli import app

    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", "--model-path", str(root / "model"), "--output-dir", str(out),
                                      "--bits", str(bits)])
    assert result.exit_code == 0, result.output
    assert f"{bits}-bit weights" in result.output

    ours = {}
    for shard in out.glob("*.safetensors"):
        ours.update(load_file(shard))
    official = torch.load(root / f"model-int{bits}" / "pytorch_model.bin", weights_only=True)
    assert set(ours) == set(official)
    for key in official:  # every tensor, the fp16 ones included, bit for bit
        assert ours[key].dtype == official[key].dtype and torch.equal(ours[key], official[key]), key
    assert json.loads((out / "config.json").read_text())["quantization_bit"] == bits
    with torch.no_grad():
        logits = load_model(out)(input_ids=exp["input_ids"]).logits
    assert (logits - exp[f"int{bits}/logits"]).abs().max().item() <= TOL


def test_quantize_refuses_an_already_quantized_model_and_a_non_empty_output(golden, tmp_path):
    root, _, _ = golden
    with pytest.raises(GlmtuneError, match="already quantized"):
        quantize_checkpoint(root / "model-int4", tmp_path / "out", 4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(GlmtuneError, match="not empty"):
        quantize_checkpoint(root / "model", tmp_path / "busy", 8)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


def test_private_quantized_cpu_kernels_are_reached_through_compat_and_exist():
    from glmtune import compat

    # An upgrade that renames or drops one of these fails here, not as a silently slower exact path.
    assert compat.missing_quantized_cpu_ops() == []
    for name in compat.QUANTIZED_CPU_OPS:
        assert hasattr(torch.ops.aten, name), name
    source = (Path(qkernels.__file__)).read_text()
    assert "torch.ops" not in source  # qkernels goes through compat only


@needs_kernels
def test_auto_mode_runs_fp32_exact_and_single_bf16_tokens_on_the_kernel(monkeypatch):
    from glmtune.model import native

    monkeypatch.setattr(native, "supports", lambda n, k: False)  # torch's kernel (the native one: test_native_kernel.py)
    layer = QuantizedLinear.from_float(_linear(256, 112), 4)
    layer(torch.randn(1, 256))  # fp32: exact path, the official layout is untouched
    assert layer.weight.dtype == torch.int8
    layer.to(torch.bfloat16)(torch.randn(1, 256).bfloat16())  # a bf16 decoding step: kernel layout
    assert layer.weight.dtype == torch.uint8


@needs_kernels
def test_model_saved_after_kernel_repacking_reloads_with_official_logits(golden, tmp_path):
    from glmtune.model.loading import load_model, save_model

    root, _, exp = golden
    model = load_model(root / "model-int4")
    Q.set_quantized_mode(model, "kernel")
    with torch.no_grad():
        model(input_ids=exp["input_ids"][:1, :1])  # repacks every int4 weight into the kernel layout
    assert all(m.weight.dtype == torch.uint8 for m in model.modules() if isinstance(m, QuantizedLinear))
    saved = save_model(model, tmp_path / "saved")
    from safetensors.torch import load_file

    written = {k: v for f in saved.glob("*.safetensors") for k, v in load_file(f).items()}
    official = torch.load(root / "model-int4" / "pytorch_model.bin", weights_only=True)
    for key in filter(is_quantizable_key, official):
        assert written[key].dtype == torch.int8 and torch.equal(written[key], official[key]), key
    reloaded = load_model(saved)
    with torch.no_grad():
        logits = reloaded(input_ids=exp["input_ids"]).logits
    assert (logits - exp["int4/logits"]).abs().max().item() <= TOL


# --- decoding speed: what bench/quant.py --decode-6b found -----------------------------------


def test_last_position_logits_run_as_one_matrix_product_not_a_batched_one():
    """A prompt's last position ([1, 1, hidden], strided) used to reach F.linear as a 3-D input, which
    torch 2.13 runs as a batched matmul after copying the whole [vocab, hidden] weight transposed
    (0.5 GB, ~10 s per prompt for the 6B model on 1 thread, bench/quant.py --decode-6b)."""
    from torch.profiler import profile

    from glmtune.model.modeling import ChatGLM2ForCausalLM, glm_config_from_chatglm

    cfg = dict(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
               ffn_hidden_size=96, padded_vocab_size=512, multi_query_attention=True, add_qkv_bias=True)
    torch.manual_seed(0)
    model = ChatGLM2ForCausalLM(glm_config_from_chatglm(cfg)).eval()
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last = model(input_ids=ids, logits_to_keep=1).logits
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
        dims = [x.dim() for x in seen]
        with profile() as prof:
            model.lm_head(seen[-1])
    assert dims == [2, 2]
    assert "aten::bmm" not in {e.key for e in prof.key_averages()}


def test_single_bf16_row_logits_use_torch_gemv_without_touching_the_onednn_flag(monkeypatch):
    """oneDNN's bf16 GEMV is ~1.5x slower than torch's for the 6B output layer (bench/quant.py --decode-6b)."""
    from torch.profiler import profile

    from glmtune.model.modeling import ChatGLM2ForCausalLM, glm_config_from_chatglm

    cfg = dict(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
               ffn_hidden_size=96, padded_vocab_size=512, multi_query_attention=True, add_qkv_bias=True)
    torch.manual_seed(0)
    model = ChatGLM2ForCausalLM(glm_config_from_chatglm(cfg)).eval().to(torch.bfloat16)
    flags = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: flags.append(torch.backends.mkldnn.enabled) or real_mv(*a))
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        full = model(input_ids=ids).logits  # 6 rows: the output layer as it is
        with profile() as prof:
            last = model(input_ids=ids, logits_to_keep=1).logits  # 1 row: torch's GEMV
    assert flags == [True] and torch.backends.mkldnn.enabled  # one GEMV, the process-wide flag never changed
    assert "aten::mv" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(last.float(), full[:, -1:].float(), rtol=2e-2, atol=2e-2)
    flat = torch.randn(1, 64, dtype=torch.bfloat16)
    expected = flat.float() @ model.lm_head.weight.float().T
    torch.testing.assert_close(model._project(flat).float(), expected, rtol=1e-2, atol=1e-2)
