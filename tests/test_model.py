"""Golden parity of the native model + prefix against the official ChatGLM2 outputs, and loader behaviour."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from glmtune.errors import GlmtuneError
from glmtune.model.loading import load_model, save_model, save_prefix_checkpoint

TAGS = {"base": None, "ptuning": "ptuning", "ptuning-proj": "ptuning-proj"}
TOL = 1e-4


@pytest.fixture(scope="module")
def golden(reference):
    root = reference / "golden-model"
    return root, torch.load(root / "expected.pt", weights_only=True)


def _load(root, tag, **kw):
    ckpt = TAGS[tag]
    return load_model(root / "model", ptuning_checkpoint=(root / ckpt) if ckpt else None, **kw)


@pytest.mark.parametrize("tag", list(TAGS))
def test_logits_and_loss_match_official(golden, tag):
    root, exp = golden
    model = _load(root, tag)
    with torch.no_grad():
        out = model(input_ids=exp["input_ids"], labels=exp["labels"])
    assert (out.logits - exp[f"{tag}/logits"]).abs().max().item() <= TOL
    assert abs(out.loss.item() - exp[f"{tag}/loss"].item()) <= TOL


@pytest.mark.parametrize("tag", list(TAGS))
def test_left_padded_logits_match_official_where_mask_is_one(golden, tag):
    root, exp = golden
    model = _load(root, tag)
    mask = exp["padded_attention_mask"]
    with torch.no_grad():
        given = model(input_ids=exp["padded_input_ids"], attention_mask=mask, position_ids=exp["padded_position_ids"])
        derived = model(input_ids=exp["padded_input_ids"], attention_mask=mask)  # positions from the mask
    for out in (given, derived):
        diff = (out.logits - exp[f"{tag}/padded_logits"])[mask.bool()].abs().max().item()
        assert diff <= TOL


@pytest.mark.parametrize("tag", list(TAGS))
def test_greedy_generation_matches_official_tokens(golden, tag):
    root, exp = golden
    model = _load(root, tag)
    prompt = exp["input_ids"][:1]
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out[0, : prompt.shape[1]].tolist() == prompt[0].tolist()
    assert out[0, prompt.shape[1]:].tolist() == exp[f"{tag}/greedy"].tolist()


def test_generation_without_cache_equals_generation_with_cache(golden):
    root, exp = golden
    model = _load(root, "ptuning-proj")
    prompt = exp["input_ids"][:1]
    cached = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_left_padded_batch_generation_equals_one_by_one(golden):
    root, exp = golden
    model = _load(root, "ptuning")
    ids, mask = exp["padded_input_ids"], exp["padded_attention_mask"]
    batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()][None]
        single = model.generate(input_ids=real, max_new_tokens=5, do_sample=False)
        assert batch[row, ids.shape[1]:].tolist() == single[0, real.shape[1]:].tolist()


def test_sampling_with_prefix_is_reproducible_with_a_seed(golden):
    root, exp = golden
    model = _load(root, "ptuning")
    prompt = exp["input_ids"][:1]
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(input_ids=prompt, max_new_tokens=8, do_sample=True, top_p=0.8, temperature=0.8))
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0].shape[1] == prompt.shape[1] + 8 or runs[0][0, -1].item() == 2


def test_only_the_prefix_is_trainable(golden):
    root, _ = golden
    model = _load(root, "ptuning-proj")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.prefix_encoder.named_parameters(prefix="prefix_encoder")}


def test_prefix_gradient_is_the_same_with_gradient_checkpointing(golden):
    root, exp = golden
    grads = []
    for checkpointing in (False, True):
        model = _load(root, "ptuning-proj")
        model.train()
        model.prefix_encoder.dropout.p = 0.0  # same forward both times
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(input_ids=exp["input_ids"], labels=exp["labels"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert abs(out.loss.item() - exp["ptuning-proj/loss"].item()) <= TOL
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_label_only_loss_equals_full_loss(golden):
    root, exp = golden
    model = _load(root, "ptuning")
    with torch.no_grad():
        full = model(input_ids=exp["input_ids"], labels=exp["labels"]).loss
        fast = model(input_ids=exp["input_ids"], labels=exp["labels"], loss_only=True)
    assert fast.logits is None
    assert abs(full.item() - fast.loss.item()) <= 1e-6


def test_prefix_dropout_is_active_in_training_only(golden):
    root, exp = golden
    model = _load(root, "ptuning")
    with torch.no_grad():
        a = model(input_ids=exp["input_ids"]).logits
        b = model(input_ids=exp["input_ids"]).logits
        model.train()
        c = model(input_ids=exp["input_ids"]).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_bfloat16_load_runs_close_to_fp32(golden):
    root, exp = golden
    model = _load(root, "ptuning", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.prefix_encoder.embedding.weight.dtype == torch.float32  # prefix trains in fp32
    with torch.no_grad():
        logits = model(input_ids=exp["input_ids"]).logits.float()
    # bf16 keeps 8 mantissa bits; through two layers the relative error measured here is ~2%.
    ref = exp["ptuning/logits"]
    assert ((logits - ref).norm() / ref.norm()).item() < 0.05


# --- round trips -------------------------------------------------------------------------------


def test_save_and_reload_gives_identical_logits_sharded(golden, tmp_path):
    root, exp = golden
    model = _load(root, "base")
    save_model(model, tmp_path / "saved", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in index["weight_map"]
    again = load_model(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(model(input_ids=exp["input_ids"]).logits, again(input_ids=exp["input_ids"]).logits)


def test_single_bin_and_single_safetensors_load_identically(golden, tmp_path):
    root, exp = golden
    state = {}
    for shard in sorted((root / "model").glob("*.bin")):
        state.update(torch.load(shard, weights_only=True))
    for name in ("bin", "st"):
        (tmp_path / name).mkdir()
        shutil.copy(root / "model" / "config.json", tmp_path / name)
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "st" / "model.safetensors"))
    outs = []
    for name in ("bin", "st"):
        with torch.no_grad():
            outs.append(load_model(tmp_path / name)(input_ids=exp["input_ids"]).logits)
    assert torch.equal(outs[0], outs[1])
    assert (outs[0] - exp["base/logits"]).abs().max().item() <= TOL


def test_prefix_checkpoint_saved_by_glmtune_loads_in_a_fresh_process(golden, tmp_path):
    root, exp = golden
    model = _load(root, "ptuning-proj")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_prefix_checkpoint(model, ckpt)
    official = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert set(official) == {
        "transformer.prefix_encoder.embedding.weight",
        "transformer.prefix_encoder.trans.0.weight", "transformer.prefix_encoder.trans.0.bias",
        "transformer.prefix_encoder.trans.2.weight", "transformer.prefix_encoder.trans.2.bias",
    }
    config = json.loads((ckpt / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is True
    code = (
        "import sys, torch; from glmtune import load_model;"
        "m = load_model(sys.argv[1], ptuning_checkpoint=sys.argv[2]);"
        "ids = torch.load(sys.argv[3], weights_only=True)['input_ids'];"
        "torch.save(m(input_ids=ids).logits.detach(), sys.argv[4])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(root / "model"), str(ckpt), str(root / "expected.pt"), str(tmp_path / "l.pt")],
        check=True,
    )
    logits = torch.load(tmp_path / "l.pt", weights_only=True)
    assert (logits - exp["ptuning-proj/logits"]).abs().max().item() <= TOL


# --- errors ------------------------------------------------------------------------------------


def _copy_model(root, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(root / "model", dst)
    return dst


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(GlmtuneError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_model_type_is_a_clear_error(golden, tmp_path):
    dst = _copy_model(golden[0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlmtuneError, match="model_type: expected 'chatglm'.*found 'llama'"):
        load_model(dst)


def _rewrite_shard(dst, edit):
    shard = sorted(dst.glob("*.bin"))[-1]
    state = torch.load(shard, weights_only=True)
    edit(state)
    torch.save(state, shard)


def test_missing_weight_is_named(golden, tmp_path):
    dst = _copy_model(golden[0], tmp_path)
    _rewrite_shard(dst, lambda s: s.pop("transformer.output_layer.weight"))
    with pytest.raises(GlmtuneError, match=r"missing weights: \['lm_head.weight'\]"):
        load_model(dst)


def test_unexpected_weight_is_named(golden, tmp_path):
    dst = _copy_model(golden[0], tmp_path)
    _rewrite_shard(dst, lambda s: s.__setitem__("transformer.extra.weight", torch.zeros(2)))
    with pytest.raises(GlmtuneError, match="unexpected weight 'transformer.extra.weight'"):
        load_model(dst)


def test_shape_mismatch_names_tensor_and_both_shapes(golden, tmp_path):
    dst = _copy_model(golden[0], tmp_path)
    _rewrite_shard(dst, lambda s: s.__setitem__("transformer.output_layer.weight", torch.zeros(1000, 32)))
    with pytest.raises(GlmtuneError, match=r"transformer.output_layer.weight: shape \(1000, 32\).*expects \(1000, 64\)"):
        load_model(dst)


def test_pre_seq_len_disagreeing_with_checkpoint_is_an_error(golden):
    root, _ = golden
    with pytest.raises(GlmtuneError, match="pre_seq_len mismatch: you passed 8, .* has 4"):
        load_model(root / "model", ptuning_checkpoint=root / "ptuning", pre_seq_len=8)
    with pytest.raises(GlmtuneError, match="prefix_projection mismatch"):
        load_model(root / "model", ptuning_checkpoint=root / "ptuning", prefix_projection=True)


def test_prefix_checkpoint_for_another_model_shape_is_an_error(golden, tmp_path):
    root, _ = golden
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ptuning", ckpt)
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 3 * 2 * 2 * 16)}, ckpt / "pytorch_model.bin")
    with pytest.raises(GlmtuneError, match=r"shape \(4, 192\), the model expects \(4, 128\).*layers 2"):
        load_model(root / "model", ptuning_checkpoint=ckpt)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_at_load_equals_the_official_quantized_release(golden, bits):
    root, exp = golden
    model = load_model(root / "model", quantization_bit=bits)
    with torch.no_grad():
        logits = model(input_ids=exp["input_ids"]).logits
    assert (logits - exp[f"int{bits}/logits"]).abs().max().item() <= TOL


def test_quantization_bit_disagreeing_with_a_quantized_folder_is_an_error(golden):
    root, _ = golden
    with pytest.raises(GlmtuneError, match="quantization_bit 4, but --quantization-bit 8"):
        load_model(root / "model-int4", quantization_bit=8)


def test_save_model_creates_missing_parents_and_replaces_an_old_folder_whole(golden, tmp_path):
    root, exp = golden
    model = _load(root, "base")
    out = tmp_path / "a" / "b" / "saved"
    save_model(model, out)
    (out / "stale.txt").write_text("from the previous save")
    save_model(model, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["saved"]  # no temp or old folders left
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkdtemp's owner-only mode


@pytest.mark.parametrize("config_text,message", [
    ("{not json", "not valid JSON"),
    ('{"pre_seq_len": "abc"}', "field pre_seq_len: expected a positive integer, found 'abc'"),
    ('{"prefix_projection": false}', "found None; not a P-tuning checkpoint"),
])
def test_bad_prefix_checkpoint_config_is_a_clear_error(golden, tmp_path, config_text, message):
    root, _ = golden
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ptuning", ckpt)
    (ckpt / "config.json").write_text(config_text)
    with pytest.raises(GlmtuneError, match=message):
        load_model(root / "model", ptuning_checkpoint=ckpt)


def test_corrupt_checkpoint_weights_and_index_are_clear_errors(golden, tmp_path):
    root, _ = golden
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ptuning", ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(GlmtuneError, match="model.safetensors: cannot read the checkpoint weights"):
        load_model(root / "model", ptuning_checkpoint=ckpt)
    dst = _copy_model(root, tmp_path)
    (dst / "pytorch_model.bin.index.json").write_text('{"metadata": {}}')
    with pytest.raises(GlmtuneError, match="expected an HF index with a weight_map"):
        load_model(dst)
    dst2 = tmp_path / "model2"
    shutil.copytree(root / "model", dst2)
    sorted(dst2.glob("*.bin"))[0].write_bytes(b"truncated")
    with pytest.raises(GlmtuneError, match="cannot read the weights"):
        load_model(dst2)


def test_labels_with_logits_to_keep_still_give_the_full_loss(golden):
    root, exp = golden
    model = _load(root, "base")
    with torch.no_grad():
        out = model(input_ids=exp["input_ids"], labels=exp["labels"], logits_to_keep=1)
    assert abs(out.loss.item() - exp["base/loss"].item()) <= TOL
