"""fp32 CPU inference through oneDNN (glmtune.model.cpu_linear): F.linear's results, only where autograd is off."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmtune import compat
from glmtune.model import cpu_linear
from glmtune.model.cpu_linear import OneDNNLinear, use_onednn_linears
from glmtune.model.tiny import TinyConfig


def test_onednn_linear_is_available_and_passes_its_probe_in_this_torch():
    assert cpu_linear.onednn_linear_ok()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 64, 312])
def test_onednn_linear_equals_f_linear_up_to_fp32_rounding(rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(1280, 1024) / 32, torch.randn(1280)
    for shape in ((rows, 1024), (1, rows, 1024), (rows, 1, 1024)):
        x = torch.randn(*shape)
        for b in (None, bias):
            with torch.inference_mode():
                got = compat.onednn_linear(x, weight, b)
            want = F.linear(x, weight, b)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def count_onednn_calls(monkeypatch) -> list:
    calls = []
    real = compat.onednn_linear
    monkeypatch.setattr(compat, "onednn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def test_inference_takes_onednn_only_in_fp32_on_cpu(monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    torch.manual_seed(0)
    layer = use_onednn_linears(nn.Linear(64, 32))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        layer(x)
    assert len(calls) == 2
    with torch.no_grad():
        layer.to(torch.bfloat16)(x.to(torch.bfloat16))  # other dtypes: F.linear
    assert len(calls) == 2


def test_a_layer_whose_weight_trains_keeps_f_linear_and_its_gradients(monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    layer = use_onednn_linears(nn.Linear(64, 32))  # requires_grad: e.g. the prefix encoder's MLP
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert calls == [] and layer.weight.grad is not None and x.grad is not None


def test_a_frozen_layer_in_training_gives_f_linears_input_gradient_through_onednn(monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    torch.manual_seed(1)
    layer = use_onednn_linears(nn.Linear(1024, 2736)).requires_grad_(False)  # a base layer under P-tuning
    x = torch.randn(3, 7, 1024, requires_grad=True)
    upstream = torch.randn(3, 7, 2736)
    (layer(x) * upstream).sum().backward()
    assert len(calls) == 2  # forward, and backward (grad @ W)
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, layer.weight, layer.bias) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_without_the_operator_every_layer_falls_back_to_f_linear(monkeypatch):
    calls = count_onednn_calls(monkeypatch)
    monkeypatch.setattr(cpu_linear, "onednn_linear_ok", lambda: False)
    layer = use_onednn_linears(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []


def test_every_linear_of_the_model_is_a_onednn_linear_and_the_state_dict_is_unchanged():
    from glmtune.model.modeling import ChatGLM2ForCausalLM, glm_config_from_chatglm
    from glmtune.model.tiny import official_config

    model = ChatGLM2ForCausalLM(glm_config_from_chatglm(official_config(TinyConfig(), 512)))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert "lm_head.weight" in model.state_dict() and not any("OneDNN" in k for k in model.state_dict())
