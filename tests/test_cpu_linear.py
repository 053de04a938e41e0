"""The decoding-step linear layer (glmtune.cpu_linear): same results as F.linear, row by row independent of the batch."""

import torch
import torch.nn.functional as F
from torch import nn

from glmtune import cpu_linear
from glmtune.cpu_linear import RowBlockLinear, blocked_linear, use_row_blocks
from glmtune.tiny import TinyConfig


def big_linear(bias: bool = True, seed: int = 0) -> RowBlockLinear:
    """A layer just at the size threshold (4096 x 1024 fp32 = 16 MiB), so it takes the blocked path."""
    torch.manual_seed(seed)
    layer = use_row_blocks(nn.Linear(1024, 4096, bias=bias))
    assert layer.weight.numel() * 4 >= cpu_linear.MIN_WEIGHT_BYTES
    return layer


def test_blocked_linear_matches_f_linear_for_one_to_eight_rows_with_and_without_bias():
    torch.manual_seed(1)
    weight, bias = torch.randn(4096, 1024) / 32, torch.randn(4096)
    for rows in range(1, 9):
        for shape in ((rows, 1024), (rows, 1, 1024)):
            x = torch.randn(*shape)
            for b in (None, bias):
                got, want = blocked_linear(x, weight, b), F.linear(x, weight, b)
                assert got.shape == want.shape and got.is_contiguous()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_rows_output_is_bitwise_the_same_alone_and_anywhere_in_a_batch():
    layer = big_linear()
    torch.manual_seed(2)
    row = torch.randn(1, 1024)
    with torch.inference_mode():
        alone = layer(row)
        for size in range(2, 9):
            for position in range(size):
                batch = torch.randn(size, 1024)
                batch[position] = row[0]
                assert torch.equal(layer(batch)[position], alone[0]), (size, position)


def test_the_blocked_path_is_taken_only_for_few_fp32_cpu_rows_of_a_large_weight_without_autograd(monkeypatch):
    calls = []
    real = cpu_linear.blocked_linear
    monkeypatch.setattr(cpu_linear, "blocked_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    layer = big_linear()
    small = use_row_blocks(nn.Linear(64, 32))
    with torch.no_grad():
        layer(torch.randn(8, 1024))
        layer(torch.randn(2, 4, 1024))
        assert len(calls) == 2
        layer(torch.randn(cpu_linear.MAX_ROWS + 1, 1024))  # a prompt: more rows
        layer.to(torch.bfloat16)(torch.randn(1, 1024, dtype=torch.bfloat16))  # other dtype
        layer.float()
        small(torch.randn(1, 64))  # a weight that fits in the caches
    assert len(calls) == 2
    out = layer(torch.randn(1, 1024))  # autograd on: training takes F.linear, gradients reach the weight
    out.sum().backward()
    assert len(calls) == 2 and layer.weight.grad is not None


def test_with_autograd_the_layer_is_exactly_f_linear():
    layer = big_linear()
    x = torch.randn(3, 1024)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_every_linear_of_the_model_is_a_row_block_linear_and_the_state_dict_is_unchanged():
    from glmtune.modeling import ChatGLM2ForCausalLM, glm_config_from_chatglm
    from glmtune.tiny import official_config

    cfg = TinyConfig()
    model = ChatGLM2ForCausalLM(glm_config_from_chatglm(official_config(cfg, 512)))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is RowBlockLinear for m in linears)
    assert "lm_head.weight" in model.state_dict() and not any("RowBlock" in k for k in model.state_dict())
