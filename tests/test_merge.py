"""`glmtune merge`: a merged folder (plain or with the prefix projection folded) generates exactly the
tokens of base + checkpoint, needs no flags, and never overwrites a non-empty folder by accident."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glmtune.inference.chat import chat, load_chat_model
from glmtune.errors import GlmtuneError
from glmtune.model.loading import load_model, save_prefix_checkpoint
from glmtune.model.merge import merge_checkpoint
from glmtune.model.tiny import init_model

QUESTIONS = ["你好", "这款连衣裙适合什么场合"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model_dir = init_model(root / "model")
    torch.manual_seed(1)
    model = load_model(model_dir, pre_seq_len=4, prefix_projection=True)
    ckpt = root / "checkpoint-1"
    ckpt.mkdir()
    save_prefix_checkpoint(model, ckpt)
    return root, model_dir, ckpt


def greedy_tokens(model, tok, n=12):
    out = []
    for q in QUESTIONS:
        ids = tok([tok.build_prompt(q)], return_tensors="pt")["input_ids"]
        out.append(model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def reference_tokens(tiny):
    _, model_dir, ckpt = tiny
    return greedy_tokens(*load_chat_model(model_dir, ckpt, device="cpu", dtype="float32"))


def _keys(folder):
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys.update(h.keys())
    return keys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_merged_folder_generates_the_same_tokens_as_base_plus_checkpoint(tiny, reference_tokens):
    root, model_dir, ckpt = tiny
    result = merge_checkpoint(model_dir, ckpt, root / "merged")
    out = result.output_dir
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["pre_seq_len"], cfg["prefix_projection"]) == (4, True) and not result.folded
    assert (out / "tokenizer.model").is_file()
    assert "transformer.prefix_encoder.trans.0.weight" in _keys(out)
    model, tok = load_chat_model(out, device="cpu", dtype="float32")  # no flags: all from the folder
    assert greedy_tokens(model, tok) == reference_tokens
    base = load_chat_model(model_dir, device="cpu", dtype="float32")
    assert greedy_tokens(*base) != reference_tokens  # the prefix matters, so equality means it was merged


def test_folded_prefix_stores_the_projected_prefix_and_generates_the_same_tokens(tiny, reference_tokens):
    root, model_dir, ckpt = tiny
    result = merge_checkpoint(model_dir, ckpt, root / "folded", fold=True)
    out = result.output_dir
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["pre_seq_len"], cfg["prefix_projection"]) == (4, False) and result.folded
    prefix_keys = {k for k in _keys(out) if "prefix_encoder" in k}
    assert prefix_keys == {"transformer.prefix_encoder.embedding.weight"}
    original = load_model(model_dir, ptuning_checkpoint=ckpt)
    folded = load_model(out)
    with torch.no_grad():
        assert torch.equal(folded.prefix_encoder.embedding.weight, original.prefix_encoder.prefix_states())
    assert greedy_tokens(folded, load_chat_model(out)[1]) == reference_tokens
    assert result.total_bytes < merge_checkpoint(model_dir, ckpt, root / "plain2").total_bytes


def test_sharded_merge_writes_an_index_and_loads_to_the_same_tokens(tiny, reference_tokens):
    root, model_dir, ckpt = tiny
    out = merge_checkpoint(model_dir, ckpt, root / "sharded", max_shard_bytes=300_000).output_dir
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert greedy_tokens(*load_chat_model(out, device="cpu", dtype="float32")) == reference_tokens


def test_merge_refuses_a_non_empty_output_folder_without_force(tiny):
    root, model_dir, ckpt = tiny
    out = root / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _cli("merge", "--model-path", model_dir, "--ptuning-checkpoint", ckpt, "--output-dir", out)
    assert proc.returncode == 2 and "not empty (pass --force" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    merge_checkpoint(model_dir, ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_merge_refuses_an_output_folder_that_is_or_holds_an_input_even_with_force(tiny):
    root, model_dir, ckpt = tiny
    for out in (model_dir, ckpt, root):
        with pytest.raises(GlmtuneError, match="is or contains the input folder"):
            merge_checkpoint(model_dir, ckpt, out, force=True)
    assert (model_dir / "config.json").is_file() and (ckpt / "config.json").is_file()


def test_cli_merge_then_chat_on_the_merged_folder_answers_as_base_plus_checkpoint(tiny):
    root, model_dir, ckpt = tiny
    out = root / "cli-folded"
    proc = _cli("merge", "--model-path", model_dir, "--ptuning-checkpoint", ckpt, "--output-dir", out, "--fold-prefix")
    assert proc.returncode == 0, proc.stderr
    assert "prefix_projection false (projection folded)" in proc.stdout
    proc = _cli("chat", "--model-path", out, "--device", "cpu", "--greedy", "--max-new-tokens", 10,
                "--query", QUESTIONS[1], "--json")
    assert proc.returncode == 0, proc.stderr
    expected, _ = chat(*load_chat_model(model_dir, ckpt, device="cpu", dtype="float32"), QUESTIONS[1],
                       do_sample=False, max_new_tokens=10)
    assert json.loads(proc.stdout)["response"] == expected


def test_eval_on_the_merged_folder_without_flags_predicts_as_base_plus_checkpoint(tiny, tmp_path):
    from glmtune.data import preprocess as data
    from glmtune.evaluation import generate as evaluate

    root, model_dir, ckpt = tiny
    merged = merge_checkpoint(model_dir, ckpt, root / "for-eval", fold=True).output_dir
    dev = Path(__file__).resolve().parents[1] / "data" / "adgen_sample" / "dev.json"
    common = dict(test_file=dev, config=data.DataConfig(max_samples=4), device="cpu", progress=False,
                  settings=evaluate.GenerationSettings(max_new_tokens=8), cache_dir=tmp_path / "cache")
    unmerged = evaluate.run_eval(model_dir, tmp_path / "a", ptuning_checkpoint=ckpt, **common)
    from_merged = evaluate.run_eval(merged, tmp_path / "b", **common)
    assert from_merged.predictions == unmerged.predictions and len(unmerged.predictions) == 4


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_merge_stores_quantized_weights_and_loads_to_the_same_tokens(tiny, bits):
    root, model_dir, ckpt = tiny
    out = merge_checkpoint(model_dir, ckpt, root / f"int{bits}", quantization_bit=bits).output_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_bit"] == bits and cfg["pre_seq_len"] == 4
    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        assert h.get_tensor("transformer.encoder.layers.0.self_attention.query_key_value.weight").dtype == torch.int8
    merged = load_chat_model(out, device="cpu", dtype="float32")
    direct = load_chat_model(model_dir, ckpt, quantization_bit=bits, device="cpu", dtype="float32")
    assert greedy_tokens(*merged) == greedy_tokens(*direct)
