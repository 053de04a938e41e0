"""GLM-4 on the model side: golden parity of GLM-4-9B-chat (ChatGLM layout) and GLM-4-0414 (transformers'
Glm4ForCausalLM), their PEFT prefix adapters both ways, and the refusals of adapters made for another model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmtune.errors import GlmtuneError
from glmtune.model.adapter import GLMTUNE_ADAPTER, POSITIONS_AFTER_PREFIX, POSITIONS_FROM_0
from glmtune.model.loading import load_model, save_model, save_prefix_checkpoint
from glmtune.model.modeling import glm_config_from_chatglm

TOL = 1e-4
ADAPTERS = {"base": None, "prefix": "prefix", "prefix-proj": "prefix-proj"}


@pytest.fixture(scope="module")
def glm4(reference):
    root = reference / "golden-model-glm4"
    return root, torch.load(root / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def glm4_0414(reference):
    root = reference / "golden-model-glm4-0414"
    return root, torch.load(root / "expected.pt", weights_only=True)


def _load(root, tag, **kw):
    adapter = ADAPTERS[tag]
    return load_model(root / "model", ptuning_checkpoint=(root / adapter) if adapter else None, **kw)


def _assert_reduced_logits(logits, exp, key, mask=None):
    """The README's comparison of a reduced golden: chosen columns and logsumexp within 1e-4, argmax exact."""
    cols = logits[..., exp["columns"]] - exp[f"{key}_cols"]
    lse = logits.double().logsumexp(-1).float() - exp[f"{key}_lse"]
    same_argmax = logits.argmax(-1) == exp[f"{key}_argmax"]
    if mask is not None:
        keep = mask.bool()
        cols, lse, same_argmax = cols[keep], lse[keep], same_argmax[keep]
    assert cols.abs().max() <= TOL, key
    assert lse.abs().max() <= TOL, key
    assert same_argmax.all(), key


@pytest.mark.parametrize("tag", list(ADAPTERS))
def test_glm4_chat_logits_loss_and_greedy_equal_the_official_model(glm4, tag):
    root, exp = glm4
    model = _load(root, tag)
    assert model.prefix_config is None if tag == "base" else model.prefix_config.pre_seq_len == 4
    padded_key = f"{tag}/padded_logits" if tag == "base" else f"{tag}/padded_logits_pos"
    with torch.no_grad():
        _assert_reduced_logits(model(exp["input_ids"]).logits, exp, f"{tag}/logits")
        padded = model(exp["padded_input_ids"], attention_mask=exp["padded_attention_mask"]).logits
        _assert_reduced_logits(padded, exp, padded_key, exp["padded_attention_mask"])
        loss = model(exp["input_ids"], labels=exp["labels"]).loss
        out = model.generate(exp["input_ids"][:1], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert abs(loss.item() - exp[f"{tag}/loss"].item()) <= TOL
    greedy_key = f"{tag}/greedy" if tag == "base" else f"{tag}/greedy_pos"
    assert out[0, 7:].tolist() == exp[greedy_key].tolist()


@pytest.mark.parametrize("tag", ["prefix", "prefix-proj"])
def test_official_peft_positions_are_what_the_golden_records_for_the_peft_path(glm4, tag):
    """The official PEFT inference drops position_ids: padded rows count from their first pad and every decoded
    token sits at position 0. glmtune computes the intended positions; given PEFT's, it gives PEFT's numbers."""
    root, exp = glm4
    model = _load(root, tag)
    with torch.no_grad():
        counting_pads = torch.arange(7).expand(2, 7)
        padded = model(exp["padded_input_ids"], attention_mask=exp["padded_attention_mask"],
                       position_ids=counting_pads).logits
        _assert_reduced_logits(padded, exp, f"{tag}/padded_logits", exp["padded_attention_mask"])
        ids = exp["input_ids"][:1]
        out = model(ids, use_cache=True)
        cache, tokens = out.cache, []
        for _ in range(6):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token.item())
            ids = torch.cat([ids, token], dim=1)
            out = model(token, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(token),
                        cache=cache, use_cache=True)
    assert tokens == exp[f"{tag}/greedy"].tolist()
    assert tokens != exp[f"{tag}/greedy_pos"].tolist()  # the difference is real


def test_rope_base_of_the_real_glm4_config_is_10000_times_rope_ratio(reference):
    cfg = json.loads((reference / "glm-4-9b-chat" / "config.json").read_text())
    config = glm_config_from_chatglm(cfg)
    assert config.rope_parameters["rope_theta"] == 10000.0 * 500
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.rope_parameters["rope_type"] == "default"  # not ChatGLM2-32k's position interpolation
    assert (config.vocab_size, config.num_key_value_heads, config.head_dim) == (151552, 2, 128)


def test_glm4_folder_with_the_official_tokenizer_config_is_read_as_glm4(glm4, reference, tmp_path):
    """The GLM-4 tokenizer config names the role tokens ChatGLM3's does; the model config still says GLM-4."""
    dst = tmp_path / "model"
    shutil.copytree(glm4[0] / "model", dst)
    shutil.copy(reference / "glm-4-9b-chat" / "tokenizer_config.json", dst)
    model = load_model(dst)
    assert model.chatglm_config["glmtune_family"] == "glm4"
    assert model.config.rope_parameters["rope_theta"] == 5e6


def _adapter_from_past(past, folder, positions=POSITIONS_FROM_0):
    """A PEFT adapter folder holding a prefix given as [layers, 2, 1, groups, tokens, kv] keys/values."""
    layers, _, _, groups, tokens, kv = past.shape
    prompt = past[:, :, 0].permute(3, 0, 1, 2, 4).reshape(tokens, layers * 2 * groups * kv)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": prompt.contiguous()}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tokens, "num_layers": layers,
        "num_attention_heads": groups, "token_dim": groups * kv, "num_transformer_submodules": 1}))
    if positions is not None:
        (folder / GLMTUNE_ADAPTER).write_text(json.dumps({"positions": positions}))
    return folder


def test_prefix_past_of_the_golden_equals_the_adapter_layout(glm4):
    root, exp = glm4
    for tag in ("prefix", "prefix-proj"):
        model = _load(root, tag)
        with torch.no_grad():
            kv = model.prefix_encoder(1, torch.float32)
        past = torch.stack([torch.stack([k, v]) for k, v in kv])
        assert torch.equal(past, exp[f"{tag}/prompt_past"])


@pytest.mark.parametrize("with_prefix", [False, True])
def test_glm4_0414_logits_loss_and_greedy_equal_transformers_positions_from_0(glm4_0414, tmp_path, with_prefix):
    root, exp = glm4_0414
    adapter = _adapter_from_past(exp["prefix_past"], tmp_path / "adapter") if with_prefix else None
    model = load_model(root / "model", ptuning_checkpoint=adapter)
    assert type(model).__name__ == "Glm4PrefixForCausalLM"
    tag = "prefix0" if with_prefix else "base"
    mask = exp["padded_attention_mask"].bool()
    with torch.no_grad():
        logits = model(exp["input_ids"]).logits
        padded = model(exp["padded_input_ids"], attention_mask=exp["padded_attention_mask"]).logits
        loss = model(exp["input_ids"], labels=exp["labels"]).loss
        out = model.generate(exp["input_ids"][:1], max_new_tokens=6, do_sample=False)
    assert (logits - exp[f"{tag}/logits"]).abs().max() <= TOL
    assert (padded - exp[f"{tag}/padded_logits"])[mask].abs().max() <= TOL
    assert abs(loss.item() - exp[f"{tag}/loss"].item()) <= TOL
    assert out[0, 7:].tolist() == exp[f"{tag}/greedy"].tolist()
    if with_prefix:  # the other convention's golden differs: the comparison above can fail
        assert (logits - exp["prefixP/logits"]).abs().max() > 1e-2


@pytest.mark.parametrize("positions", [POSITIONS_AFTER_PREFIX, None])
def test_0414_adapter_under_another_or_no_position_convention_is_refused(glm4_0414, tmp_path, positions):
    root, exp = glm4_0414
    adapter = _adapter_from_past(exp["prefix_past"], tmp_path / "adapter", positions=positions)
    with pytest.raises(GlmtuneError, match=f"{POSITIONS_AFTER_PREFIX}.*{POSITIONS_FROM_0}"):
        load_model(root / "model", ptuning_checkpoint=adapter)


def test_glm4_0414_save_and_reload_keeps_transformers_layout(glm4_0414, tmp_path):
    root, exp = glm4_0414
    out = save_model(load_model(root / "model"), tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm4"
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(root / "model" / "model.safetensors")))
    with torch.no_grad():
        logits = load_model(out)(exp["input_ids"]).logits
    assert (logits - exp["base/logits"]).abs().max() <= TOL


# --- refusals ------------------------------------------------------------------------------------


def _edited_adapter(src, dst, edit_config=None, edit_tensor=None, own=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensor:
        prompt = load_file(str(dst / "adapter_model.safetensors"))["prompt_embeddings"]
        save_file({"prompt_embeddings": edit_tensor(prompt).contiguous()}, str(dst / "adapter_model.safetensors"))
    if own is not None:
        (dst / GLMTUNE_ADAPTER).write_text(json.dumps(own))
    return dst


def _halve_kv(cfg):
    cfg["token_dim"] //= 2


def _three_layers(cfg):
    cfg["num_layers"] = 3


def _one_group(cfg):
    cfg["num_attention_heads"] = 1


@pytest.mark.parametrize("edit, tensor, message", [
    (_three_layers, lambda t: torch.cat([t, t[:, :32]], 1), "made for 3 layers, the base model has 2"),
    (_one_group, None, "made for 1 key/value groups, the base model has 2"),
    (_halve_kv, lambda t: t[:, :32], r"made for 4 kv width \(kv_channels\), the base model has 8"),
])
def test_adapter_for_another_layer_group_or_kv_shape_is_refused_naming_both(glm4, tmp_path, edit, tensor, message):
    root, _ = glm4
    adapter = _edited_adapter(root / "prefix", tmp_path / "a", edit, tensor)
    with pytest.raises(GlmtuneError, match=message):
        load_model(root / "model", ptuning_checkpoint=adapter)


def test_adapter_recorded_for_another_family_is_refused_naming_both(glm4, tmp_path):
    root, _ = glm4
    adapter = _edited_adapter(root / "prefix", tmp_path / "a", own={"glmtune_family": "chatglm3"})
    with pytest.raises(GlmtuneError, match="of a chatglm3 model, but the base model is glm4"):
        load_model(root / "model", ptuning_checkpoint=adapter)


def test_glm4_adapter_on_a_chatglm3_model_is_refused(glm4, reference):
    with pytest.raises(GlmtuneError, match="made for 8 kv width.*has 16"):
        load_model(reference / "golden-model-glm3" / "model", ptuning_checkpoint=glm4[0] / "prefix")


@pytest.mark.parametrize("edit, tensor, message", [
    (lambda c: c.update(peft_type="LORA"), None, "peft_type: expected 'PREFIX_TUNING'.*found 'LORA'"),
    (lambda c: c.update(num_virtual_tokens=0), None, "num_virtual_tokens: expected a positive integer, found 0"),
    (None, lambda t: t[:3], r"prompt_embeddings has shape \(3, 64\).*implies \(4, 64\)"),
])
def test_malformed_adapter_is_one_clear_error(glm4, tmp_path, edit, tensor, message):
    root, _ = glm4
    adapter = _edited_adapter(root / "prefix", tmp_path / "a", edit, tensor)
    with pytest.raises(GlmtuneError, match=message):
        load_model(root / "model", ptuning_checkpoint=adapter)


# --- glmtune's own GLM-4 checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
def test_glm4_checkpoint_is_a_peft_adapter_folder_like_the_demos(glm4, tmp_path, projection):
    root, exp = glm4
    torch.manual_seed(0)
    model = load_model(root / "model", pre_seq_len=3, prefix_projection=projection)
    assert model.prefix_encoder.dropout.p == 0.0  # PEFT prefix tuning has no prefix dropout
    with torch.no_grad():
        for p in model.prefix_encoder.parameters():
            p.normal_(0, 0.5)
    out = tmp_path / "ckpt"
    out.mkdir()
    save_prefix_checkpoint(model, out)
    golden_cfg = json.loads((root / "prefix" / "adapter_config.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg) == set(golden_cfg)
    assert {k: cfg[k] for k in cfg if k not in ("base_model_name_or_path", "num_virtual_tokens", "prefix_projection")} \
        == {k: golden_cfg[k] for k in cfg if k not in ("base_model_name_or_path", "num_virtual_tokens", "prefix_projection")}
    assert (cfg["num_virtual_tokens"], cfg["prefix_projection"]) == (3, projection)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (3, 64) and tensors["prompt_embeddings"].dtype == torch.float32
    assert json.loads((out / GLMTUNE_ADAPTER).read_text())["positions"] == POSITIONS_FROM_0
    model.eval()
    reloaded = load_model(root / "model", ptuning_checkpoint=out)
    assert reloaded.prefix_config.prefix_projection == projection  # the MLP comes back for resuming
    with torch.no_grad():
        assert torch.equal(reloaded(exp["input_ids"]).logits, model(exp["input_ids"]).logits)
    # Without glmtune's side file, as PEFT sees it: the projected prefix, the same numbers.
    (out / GLMTUNE_ADAPTER).unlink()
    plain = load_model(root / "model", ptuning_checkpoint=out)
    assert not plain.prefix_config.prefix_projection
    with torch.no_grad():
        torch.testing.assert_close(plain(exp["input_ids"]).logits, model(exp["input_ids"]).logits, rtol=0, atol=1e-5)


def test_peft_reads_glmtune_and_demo_adapters_into_the_same_prefix_layout(glm4, tmp_path):
    """The peft library loads a glmtune GLM-4 checkpoint as it loads the demo's: same config class and fields,
    same `prompt_embeddings`, and PEFT's past key/values equal the prefix glmtune feeds each layer."""
    peft = pytest.importorskip("peft")
    root, exp = glm4
    model = _load(root, "prefix-proj")
    out = tmp_path / "ckpt"
    out.mkdir()
    save_prefix_checkpoint(model, out)
    for folder in (root / "prefix-proj", out):
        config = peft.PeftConfig.from_pretrained(str(folder))
        assert isinstance(config, peft.PrefixTuningConfig)
        assert (config.num_virtual_tokens, config.num_layers, config.num_attention_heads, config.token_dim) == \
            (4, 2, 2, 16)
    from transformers import GlmConfig, GlmForCausalLM

    tiny = GlmForCausalLM(GlmConfig(vocab_size=16, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                    eos_token_id=1, bos_token_id=None))
    peft_model = peft.PeftModelForCausalLM.from_pretrained(tiny, str(out))
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight,
                       load_file(str(root / "prefix-proj" / "adapter_model.safetensors"))["prompt_embeddings"])
    with torch.no_grad():
        past = peft_model.get_prompt(batch_size=1)
    layers = [past.layers[i] for i in range(2)] if hasattr(past, "layers") else past
    for i, layer in enumerate(layers):
        key, value = (layer.keys, layer.values) if hasattr(layer, "keys") else (layer[0], layer[1])
        assert torch.equal(key, exp["prefix-proj/prompt_past"][i, 0])
        assert torch.equal(value, exp["prefix-proj/prompt_past"][i, 1])


def test_gradient_checkpointing_gives_the_same_glm4_prefix_gradient(glm4):
    root, exp = glm4
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_model(root / "model", pre_seq_len=4, prefix_projection=True)
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(input_ids=exp["input_ids"], labels=exp["labels"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == {"prefix_encoder.embedding.weight", "prefix_encoder.trans.0.weight",
                             "prefix_encoder.trans.0.bias", "prefix_encoder.trans.2.weight", "prefix_encoder.trans.2.bias"}
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tag", ["prefix", "prefix-proj"])
def test_serve_loads_the_demo_adapter_as_the_prefix_the_golden_records(glm4, tag):
    from glmtune.serve.models import load_adapter

    root, exp = glm4
    adapter = load_adapter(load_model(root / "model"), "a", root / tag)
    assert adapter.pre_seq_len == 4
    past = torch.stack([torch.stack([k, v]) for k, v in adapter.kv])
    assert torch.equal(past, exp[f"{tag}/prompt_past"])


def test_serve_refuses_an_adapter_of_another_model(glm4, reference):
    from glmtune.serve.models import load_adapter

    with pytest.raises(GlmtuneError, match="made for 8 kv width.*has 16"):
        load_adapter(load_model(reference / "golden-model-glm3" / "model"), "a", glm4[0] / "prefix")
