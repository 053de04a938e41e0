"""Tiny random ChatGLM2 models (`glmtune init-model`): official layout, determinism, sharding, tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from glmtune.errors import GlmtuneError
from glmtune.model.tiny import init_model
from glmtune.families.tokenizer import load_tokenizer

LAYERS, HIDDEN, HEADS, KV, GROUPS, FFN = 2, 64, 4, 16, 2, 160


def expected_shapes(vocab: int, layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Official ChatGLM2 names and shapes (as in chatglm2-6b's pytorch_model.bin.index.json)."""
    qkv = (HEADS + 2 * GROUPS) * KV
    shapes = {
        "transformer.embedding.word_embeddings.weight": (vocab, HIDDEN),
        "transformer.rotary_pos_emb.inv_freq": (KV // 4,),
        "transformer.encoder.final_layernorm.weight": (HIDDEN,),
        "transformer.output_layer.weight": (vocab, HIDDEN),
    }
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attention.query_key_value.weight": (qkv, HIDDEN),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (HIDDEN, HEADS * KV),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.dense_h_to_4h.weight": (2 * FFN, HIDDEN),
            p + "mlp.dense_4h_to_h.weight": (HIDDEN, FFN),
        }
    return shapes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def test_writes_official_files_names_and_shapes(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"
    }
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    state = load_file(tiny_dir / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(config["padded_vocab_size"])
    assert all(v.dtype == torch.float32 for v in state.values())


def test_config_has_the_official_fields_and_a_vocab_padded_to_64(tiny_dir, reference):
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    golden = json.loads((reference / "golden-model" / "model" / "config.json").read_text(encoding="utf-8"))
    assert list(config) == list(golden)
    tokenizer = load_tokenizer(tiny_dir)
    assert config["padded_vocab_size"] % 64 == 0
    assert len(tokenizer) <= config["padded_vocab_size"] < len(tokenizer) + 64
    assert len(tokenizer) == tokenizer.n_pieces + 5
    expected = {"model_type": "chatglm", "num_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS,
                "kv_channels": KV, "multi_query_group_num": GROUPS, "ffn_hidden_size": FFN, "seq_length": 2048,
                "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}
    assert {k: config[k] for k in expected} == expected


def test_initialisation_is_normal_002_with_unit_norms_zero_bias_and_official_rope(tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    for name, tensor in state.items():
        if name.endswith("layernorm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith(".bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        elif name.endswith("inv_freq"):
            dim = KV // 2
            assert torch.allclose(tensor, 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
        else:
            assert abs(tensor.std().item() - 0.02) < 0.002 and abs(tensor.mean().item()) < 0.002, name


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny_dir, tmp_path):
    again = init_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.model", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    other = load_file(init_model(tmp_path / "other", seed=1) / "model.safetensors")
    base = load_file(tiny_dir / "model.safetensors")
    assert not torch.equal(other["transformer.output_layer.weight"], base["transformer.output_layer.weight"])


@pytest.mark.parametrize("fmt, stem, ext", [("bin", "pytorch_model", "bin"), ("safetensors", "model", "safetensors")])
def test_sharded_weights_match_their_index(tmp_path, fmt, stem, ext):
    out = init_model(tmp_path / "sharded", layers=3, weights_format=fmt, shards=3)
    index = json.loads((out / f"{stem}.{ext}.index.json").read_text(encoding="utf-8"))
    shard_names = sorted(p.name for p in out.glob(f"{stem}-*.{ext}"))
    assert shard_names == [f"{stem}-{k:05d}-of-00003.{ext}" for k in (1, 2, 3)]
    assert not (out / f"{stem}.{ext}").exists()
    merged, total = {}, 0
    for name in shard_names:
        part = load_file(out / name) if ext == "safetensors" else torch.load(out / name, weights_only=True)
        assert part, f"{name} is empty"
        assert all(index["weight_map"][k] == name for k in part)
        total += sum(v.numel() * v.element_size() for v in part.values())
        merged |= part
    assert set(merged) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    vocab = json.loads((out / "config.json").read_text(encoding="utf-8"))["padded_vocab_size"]
    assert {k: tuple(v.shape) for k, v in merged.items()} == expected_shapes(vocab, layers=3)


def test_tokenizer_encodes_unseen_chinese_and_ascii_without_unk(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    text = "龘靐齉，这款BRAND连衣裙 size M 很好看！😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text)[:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]


def test_given_texts_train_the_tokenizer(tiny_dir, tmp_path):
    sentence = "独一无二的句子"
    out = init_model(tmp_path / "t", texts=[sentence] * 50 + ["另一个句子"] * 50, vocab_size=400)
    assert len(load_tokenizer(out).tokenize(sentence)) <= 2  # learned as (nearly) one piece
    assert len(load_tokenizer(tiny_dir).tokenize(sentence)) > 2  # the bundled-data tokenizer never saw it


def test_existing_folder_is_kept_unless_overwrite(tiny_dir, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(GlmtuneError, match="not empty"):
        init_model(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    init_model(target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary folders left behind


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": 3}, "multiple of --groups"),
        ({"kv_channels": 6}, "multiple of 4"),
        ({"weights_format": "gguf"}, "--format"),
        ({"shards": 99}, "--shards"),
        ({"vocab_size": 100}, "--vocab-size"),
    ],
)
def test_bad_settings_raise_and_write_nothing(tmp_path, kwargs, message):
    with pytest.raises(GlmtuneError, match=message):
        init_model(tmp_path / "bad", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_init_model_writes_the_model_and_reports_errors(tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, "-m", "glmtune", "init-model", str(out), "--format", "bin", "--shards", "2", "--seed", "7"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "pytorch_model.bin.index.json" in run.stdout and "padded vocab" in run.stdout
    assert (out / "pytorch_model-00002-of-00002.bin").is_file()
    again = subprocess.run(
        [sys.executable, "-m", "glmtune", "init-model", str(out)], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 2 and again.stderr.startswith("error:") and "not empty" in again.stderr
