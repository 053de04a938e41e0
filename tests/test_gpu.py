"""CUDA paths (opt-in: `pytest -m gpu`; skipped without a CUDA device). Run on a GPU machine when lent one."""

from __future__ import annotations

import pytest
import torch

from glmtune.model.loading import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def golden(reference):
    root = reference / "golden-model"
    return root, torch.load(root / "expected.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("tag,ckpt", [("base", None), ("ptuning", "ptuning"), ("ptuning-proj", "ptuning-proj")])
def test_fp32_on_cuda_matches_official_logits_and_greedy(golden, tag, ckpt):
    root, exp = golden
    model = load_model(root / "model", ptuning_checkpoint=(root / ckpt) if ckpt else None, device="cuda")
    ids = exp["input_ids"].cuda()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.cpu()
    assert (logits - exp[f"{tag}/logits"]).abs().max().item() <= 1e-4
    out = model.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)
    assert out[0, ids.shape[1]:].cpu().tolist() == exp[f"{tag}/greedy"].tolist()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_on_cuda_matches_official_logits(golden, bits):
    root, exp = golden
    model = load_model(root / f"model-int{bits}", device="cuda")
    with torch.no_grad():
        logits = model(input_ids=exp["input_ids"].cuda()).logits.cpu()
    assert (logits - exp[f"int{bits}/logits"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_prefix_training_step_on_cuda(golden, dtype):
    root, exp = golden
    model = load_model(root / "model", ptuning_checkpoint=root / "ptuning-proj", dtype=dtype, device="cuda",
                       quantization_bit=4)
    model.train()
    model.enable_gradient_checkpointing()
    out = model(input_ids=exp["input_ids"].cuda(), labels=exp["labels"].cuda(), loss_only=True)
    out.loss.backward()
    grads = [p.grad for p in model.prefix_encoder.parameters()]
    assert torch.isfinite(out.loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
