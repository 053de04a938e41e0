"""`glmtune export --format chatglm.cpp`: the GGML encodings, the file layout, bad input, and the exported
models run by the real `chatglm-cpp` package against glmtune's own greedy decoding.

chatglm-cpp 0.4.2 lives in its own venv (it is an sdist that builds a C++ extension; `.ci/run` builds it):
its python is GLMTUNE_CHATGLM_CPP_PYTHON, else ~/.cache/glmtune/cpp-venv/bin/python. Without it the tests
that run chatglm.cpp skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from glmtune.errors import GlmtuneError
from glmtune.export import ggml
from glmtune.export.chatglm_cpp import PREFIX_TENSOR, export_chatglm_cpp, prefix_cache

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CPP_PYTHON = Path.home() / ".cache" / "glmtune" / "cpp-venv" / "bin" / "python"
QUERIES = ["类型#裙*颜色#蓝色", "类型#上衣*材质#牛仔布", "hello"]
NEW_TOKENS = 24
# Runs in the chatglm-cpp venv: greedy answers of an exported model, as token ids (prompt from chatglm.cpp's own
# chat template) and as the text its `Pipeline.chat` returns.
CPP_SCRIPT = r"""
import json, sys
import chatglm_cpp
job = json.loads(sys.argv[1])
pipe = chatglm_cpp.Pipeline(job["model"], max_length=job["max_length"])
config = chatglm_cpp._C.GenerationConfig(max_length=job["max_length"], max_new_tokens=job["new"], do_sample=False)
rows = []
for query in job["queries"]:
    messages = [chatglm_cpp.ChatMessage(role="user", content=query)]
    prompt = pipe.tokenizer.apply_chat_template(messages, job["max_length"])
    ids = pipe._sync_generate_ids(prompt, None, config)
    # Text only on request: chatglm.cpp's decoding crashes on an id past the tokenizer (the padded rows of the
    # output layer, which a random tiny model may pick; a trained one never does).
    text = pipe.chat(messages, max_length=job["max_length"], max_new_tokens=job["new"], do_sample=False).content \
        if job["text"] else None
    rows.append({"prompt": prompt, "ids": ids, "text": text})
print(json.dumps({"type": pipe.model.config.model_type_name, "rows": rows}, ensure_ascii=False))
"""


# --- the encodings, against ggml's definition ------------------------------------------------------------


def test_q4_0_block_holds_fp16_scale_of_the_signed_largest_value_and_nibbles_as_ggml():
    x = np.zeros(32, dtype=np.float32)
    x[0], x[1], x[2], x[17], x[30] = -4.0, 1.0, 4.0, 0.75, -0.26  # -4 comes first among |4|: the scale's sign
    block = ggml.quantize_q4_0(x)[0]
    d = np.frombuffer(block[:2].tobytes(), dtype="<f2")[0]
    assert d == np.float16(0.5)  # -4 / -8
    low, high = block[2:] & 0x0F, block[2:] >> 4  # values 0..15 / 16..31
    q = np.concatenate([low, high]).astype(int)
    # q = min(15, trunc(x / d + 8.5)): -4 -> 0, 1 -> 10, 4 -> 16 clamped to 15, 0.75 -> 10 (9.999.. +.5), -0.26 -> 7
    assert q[0] == 0 and q[1] == 10 and q[2] == 15 and q[17] == 10 and q[30] == 7
    assert (q[[i for i in range(32) if i not in (0, 1, 2, 17, 30)]] == 8).all()
    assert ggml.dequantize(block, ggml.Q4_0, 32)[[0, 1, 2]].tolist() == [-4.0, 1.0, 3.5]


def test_q4_0_rounds_the_float32_sum_as_the_c_code_does():
    # x / d + 8.5 computed in float32: a quotient just below 0.5 (0.49999997) plus 8.5 rounds to 9.0 in float32,
    # so ggml stores 9 where exact arithmetic would give 8.
    d = np.float32(1.0)
    x = np.zeros(32, dtype=np.float32)
    x[0] = -8.0  # d = -8 / -8 = 1
    x[1] = np.nextafter(np.float32(0.5), np.float32(0))
    assert np.float32(x[1] * (np.float32(1) / d)) + np.float32(8.5) == np.float32(9.0)
    block = ggml.quantize_q4_0(x)[0]
    assert (block[2] & 0x0F) == 0 and (block[3] & 0x0F) == 9 and (block[2] >> 4) == 8


def test_q8_0_rounds_halves_away_from_zero_and_zero_blocks_stay_zero():
    x = np.zeros((2, 32), dtype=np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 2.5, -2.5  # d = 1
    blocks = ggml.quantize_q8_0(x)
    q = blocks[0, 2:].view(np.int8)
    assert np.frombuffer(blocks[0, :2].tobytes(), "<f2")[0] == 1.0
    assert q[:3].tolist() == [127, 3, -3]
    assert not blocks[1].any()  # all-zero block: d = 0, inverse taken as 0 (no NaN)


def test_quantized_values_are_within_half_a_step_of_the_input():
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    # q4_0 spans -8d..7d, so a value of the largest magnitude's opposite sign may be clamped a whole step off.
    for kind, steps, bound in ((ggml.Q8_0, 127, 0.5), (ggml.Q4_0, 8, 1.0)):
        back = ggml.dequantize(ggml.encode(x, kind), kind, x.size).reshape(x.shape)
        step = np.abs(x.reshape(-1, 32)).max(axis=1) / steps
        err = np.abs(back - x).reshape(-1, 32).max(axis=1)
        assert (err <= step * (bound + 1e-3)).all(), kind
        assert (err > step * 0.1).all()  # and it did quantize


# --- the file ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny ChatGLM2 and a tiny ChatGLM3 (a little pre-trained, so greedy answers are text-like), each with a
    P-tuning checkpoint: ChatGLM2 a plain prefix, ChatGLM3 one through the projection MLP."""
    from glmtune.model.loading import load_model, save_prefix_checkpoint
    from glmtune.model.tiny import init_model

    root = tmp_path_factory.mktemp("cpp-export")
    out = {}
    for family, projection in (("chatglm2", False), ("chatglm3", True)):
        folder = init_model(root / family / "model", family=family, pretrain_steps=60)
        model = load_model(folder, pre_seq_len=6, prefix_projection=projection)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():  # a strong random prefix: what matters here is that it changes the answers
            for param in model.prefix_encoder.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
        checkpoint = root / family / "checkpoint"
        checkpoint.mkdir()
        save_prefix_checkpoint(model, checkpoint)
        out[family] = (folder, checkpoint)
    return out


def _read(path: Path) -> tuple[dict, dict]:
    data = path.read_bytes()
    assert data[:4] == b"ggml"
    model_type, version = struct.unpack_from("<ii", data, 4)
    fields = struct.unpack_from("<iiiiiiififiii", data, 12)
    (proto_len,) = struct.unpack_from("<i", data, 12 + 52)
    header = {"model_type": model_type, "version": version, "fields": fields, "proto_len": proto_len,
              "proto": data[68: 68 + proto_len]}
    records = {r.name: r for r in ggml.read_tensor_records(data, 68 + proto_len)}
    tensors = {name: ggml.dequantize(np.frombuffer(data, np.uint8, r.nbytes, r.offset), r.ggml_type,
                                     int(np.prod(r.shape))).reshape(r.shape) for name, r in records.items()}
    header["types"] = {name: r.ggml_type for name, r in records.items()}
    return header, tensors


def test_f32_file_holds_config_tokenizer_weights_and_the_prefix_cache(models, tmp_path):
    from safetensors.torch import load_file

    from glmtune.model.loading import load_model

    folder, checkpoint = models["chatglm3"]
    out = export_chatglm_cpp(folder, tmp_path / "m.bin", "f32", ptuning_checkpoint=checkpoint)
    header, tensors = _read(out.output)
    cfg = json.loads((folder / "config.json").read_text())
    assert header["model_type"] == 3 and header["version"] == 2
    dtype, vocab, hidden, heads, groups, layers, ffn, eps, pre, theta, max_len, eos, pad = header["fields"]
    assert (dtype, vocab, hidden, heads, groups, layers, ffn, pre, theta, max_len, eos, pad) == (
        0, cfg["padded_vocab_size"], 64, 4, 2, 2, 160, 6, 10000.0, cfg["seq_length"], 2, 0)
    assert abs(eps - 1e-5) < 1e-9
    assert header["proto"] == (folder / "tokenizer.model").read_bytes()
    weights = load_file(str(folder / "model.safetensors"))
    for name, value in weights.items():
        if name != "transformer.rotary_pos_emb.inv_freq":
            assert np.array_equal(tensors[name], value.numpy()), name
            assert header["types"][name] == ggml.F32
    # The prefix: the projected encoder output, [layers*2, groups, pre, kv], keys of layer i at row 2i.
    model = load_model(folder, ptuning_checkpoint=checkpoint)
    with torch.no_grad():
        kv = model.prefix_encoder(1, torch.float32)
    cache = tensors[PREFIX_TENSOR]
    assert header["types"][PREFIX_TENSOR] == ggml.F16 and cache.shape == (4, 2, 6, 16)
    for i, (key, value) in enumerate(kv):
        assert np.allclose(cache[2 * i], key[0].numpy(), rtol=1e-3, atol=1e-3)
        assert np.allclose(cache[2 * i + 1], value[0].numpy(), rtol=1e-3, atol=1e-3)


def test_q4_0_file_holds_ggml_blocks_of_the_matrices_and_f32_norms(models, tmp_path):
    from safetensors.torch import load_file

    folder, _ = models["chatglm2"]
    export_chatglm_cpp(folder, tmp_path / "m.bin", "q4_0")
    header, tensors = _read(tmp_path / "m.bin")
    assert header["fields"][0] == ggml.Q4_0 and header["fields"][8] == 0 and PREFIX_TENSOR not in tensors
    weights = load_file(str(folder / "model.safetensors"))
    qkv = "transformer.encoder.layers.1.self_attention.query_key_value."
    assert header["types"][qkv + "weight"] == ggml.Q4_0 and header["types"][qkv + "bias"] == ggml.F32
    expected = ggml.dequantize(ggml.quantize_q4_0(weights[qkv + "weight"].numpy()), ggml.Q4_0, tensors[qkv + "weight"].size)
    assert np.array_equal(tensors[qkv + "weight"].reshape(-1), expected)
    assert np.array_equal(tensors[qkv + "bias"], weights[qkv + "bias"].numpy())


def test_a_quantized_or_merged_folder_exports_what_its_base_and_checkpoint_export(models, tmp_path):
    from glmtune.model.merge import merge_checkpoint
    from glmtune.model.quantization import quantize_checkpoint

    folder, checkpoint = models["chatglm2"]
    merged = merge_checkpoint(folder, checkpoint, tmp_path / "merged").output_dir
    export_chatglm_cpp(folder, tmp_path / "a.bin", "f32", ptuning_checkpoint=checkpoint)
    export_chatglm_cpp(merged, tmp_path / "b.bin", "f32")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    # An official-layout int8 folder: exported as its dequantized values (what the official int8 model computes).
    int8 = quantize_checkpoint(folder, tmp_path / "int8", 8)
    export_chatglm_cpp(int8, tmp_path / "c.bin", "f32")
    _, full = _read(tmp_path / "a.bin")
    _, quant = _read(tmp_path / "c.bin")
    name = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    step = np.abs(full[name]).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(quant[name] - full[name]) <= step * 0.51 + 1e-6) and not np.array_equal(quant[name], full[name])


# --- bad input: one clear error, exit 2, nothing written ----------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "glmtune", "export", *args], capture_output=True, text=True, env=env)


def test_bad_input_is_one_error_with_exit_code_2_and_no_file(models, tmp_path):
    folder, checkpoint = models["chatglm2"]
    out = tmp_path / "out.bin"
    cases = [
        (["--format", "gguf", "--type", "f32"], "--format: expected chatglm.cpp"),
        (["--format", "chatglm.cpp", "--type", "q5_1"], "--type: expected one of f32, f16, q8_0, q4_0"),
    ]
    for extra, message in cases:
        result = _cli("--model-path", str(folder), "--output", str(out), *extra)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()
    result = _cli("--model-path", str(tmp_path / "nowhere"), "--output", str(out), "--format", "chatglm.cpp")
    assert result.returncode == 2 and "folder not found" in result.stderr and not out.exists()
    # The same command, right: it writes what the library function writes, and says what it wrote.
    result = _cli("--model-path", str(folder), "--ptuning-checkpoint", str(checkpoint), "--output", str(out),
                  "--format", "chatglm.cpp", "--type", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "ChatGLM2 model, q8_0 weights, prefix of 6 tokens" in result.stdout
    export_chatglm_cpp(folder, tmp_path / "same.bin", "q8_0", ptuning_checkpoint=checkpoint)
    assert out.read_bytes() == (tmp_path / "same.bin").read_bytes()


def test_unsupported_models_are_refused_before_writing(models, tmp_path):
    folder, checkpoint = models["chatglm2"]
    out = tmp_path / "out.bin"
    # chatglm2-6b-32k's rope rule (positions divided by rope_ratio) has no chatglm.cpp equivalent.
    long = tmp_path / "long"
    shutil.copytree(folder, long)
    cfg = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**cfg, "rope_ratio": 16}))
    with pytest.raises(GlmtuneError, match="rope_ratio 16.*divides positions"):
        export_chatglm_cpp(long, out, "f32")
    # Rows that are not whole q4_0 blocks.
    odd = tmp_path / "odd"
    from glmtune.model.tiny import init_model

    init_model(odd, hidden_size=48, heads=3, kv_channels=16, groups=1, ffn_hidden_size=96)
    with pytest.raises(GlmtuneError, match="hidden_size = 48: --type q4_0 needs a multiple of 32"):
        export_chatglm_cpp(odd, out, "q4_0")
    # A checkpoint of the other family.
    with pytest.raises(GlmtuneError, match="P-tuning checkpoint of a chatglm3 model"):
        export_chatglm_cpp(folder, out, "f32", ptuning_checkpoint=models["chatglm3"][1])
    assert not out.exists()


def test_a_failed_export_leaves_an_existing_file_as_it_was(models, tmp_path):
    folder, _ = models["chatglm2"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(broken / "model.safetensors"))
    del weights["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")
    with pytest.raises(GlmtuneError, match="file exists"):
        export_chatglm_cpp(folder, out, "f32")
    with pytest.raises(GlmtuneError, match="missing weights.*layers.1.mlp.dense_4h_to_h"):
        export_chatglm_cpp(broken, out, "f32", force=True)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out.bin"]  # no temporary file left


# --- run by chatglm.cpp ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cpp_python() -> str:
    python = os.environ.get("GLMTUNE_CHATGLM_CPP_PYTHON") or str(DEFAULT_CPP_PYTHON)
    ok = Path(python).is_file() and subprocess.run([python, "-c", "import chatglm_cpp"], capture_output=True).returncode == 0
    if not ok:
        message = (f"chatglm-cpp not importable by {python} (build it: .ci/run does, or set GLMTUNE_CHATGLM_CPP_PYTHON "
                   "to a python that has chatglm-cpp 0.4.2)")
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true makes this an error", pytrace=False)
        pytest.skip(message)
    return python


def run_cpp(python: str, model_file: Path, queries=QUERIES, new: int = NEW_TOKENS, text: bool = False) -> dict:
    job = {"model": str(model_file), "queries": list(queries), "new": new, "max_length": 256, "text": text}
    proc = subprocess.run([python, "-c", CPP_SCRIPT, json.dumps(job)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def glmtune_greedy(model, tokenizer, queries=QUERIES, new: int = NEW_TOKENS) -> list[dict]:
    """Prompt ids (the family's chat prompt) and greedy answer ids, stop token included, as glmtune generates."""
    from glmtune.families.registry import family_of

    family = family_of(tokenizer)
    rows = []
    for query in queries:
        _, ids = family.chat_prompt(tokenizer, query, [], "user")
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=new, eos_token_id=family.stop_token_ids(tokenizer))
        rows.append({"prompt": ids, "ids": out[0, len(ids):].tolist()})
    return rows


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_chatglm_cpp_decodes_the_f32_export_greedily_as_glmtune(models, family, cpp_python, tmp_path,
                                                                single_thread_own_cache):
    from glmtune.inference.chat import load_chat_model

    folder, checkpoint = models[family]
    tuned = export_chatglm_cpp(folder, tmp_path / "tuned.bin", "f32", ptuning_checkpoint=checkpoint).output
    base = export_chatglm_cpp(folder, tmp_path / "base.bin", "f32").output
    cpp_tuned, cpp_base = run_cpp(cpp_python, tuned), run_cpp(cpp_python, base)
    assert cpp_tuned["type"] == {"chatglm2": "ChatGLM2", "chatglm3": "ChatGLM3"}[family]
    model, tokenizer = load_chat_model(folder, checkpoint, device="cpu", dtype="float32")
    ours_tuned = glmtune_greedy(model, tokenizer)
    model, tokenizer = load_chat_model(folder, None, device="cpu", dtype="float32")
    ours_base = glmtune_greedy(model, tokenizer)
    for cpp, ours in ((cpp_tuned, ours_tuned), (cpp_base, ours_base)):
        for row, mine in zip(cpp["rows"], ours):
            assert row["prompt"] == mine["prompt"]  # the same chat template and tokenizer
            assert row["ids"] == mine["ids"]
            assert len(row["ids"]) >= 3
    # The prefix is really in the file and used: with and without it the answers differ.
    assert [r["ids"] for r in cpp_tuned["rows"]] != [r["ids"] for r in cpp_base["rows"]]


def test_chatglm3_32k_rope_ratio_becomes_chatglm_cpps_rotary_base(models, cpp_python, tmp_path, single_thread_own_cache):
    from glmtune.inference.chat import load_chat_model

    folder, checkpoint = models["chatglm3"]
    long = tmp_path / "long"
    shutil.copytree(folder, long)
    cfg = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**cfg, "rope_ratio": 50}))  # chatglm3-6b-32k's value
    out = export_chatglm_cpp(long, tmp_path / "long.bin", "f32", ptuning_checkpoint=checkpoint).output
    header, _ = _read(out)
    assert header["fields"][9] == 500000.0
    cpp = run_cpp(cpp_python, out, queries=QUERIES[:2])
    model, tokenizer = load_chat_model(long, checkpoint, device="cpu", dtype="float32")
    assert [r["ids"] for r in cpp["rows"]] == [r["ids"] for r in glmtune_greedy(model, tokenizer, QUERIES[:2])]


def test_glmtune_chat_greedy_prints_what_chatglm_cpp_answers(models, cpp_python, tmp_path):
    folder, checkpoint = models["chatglm3"]
    tuned = export_chatglm_cpp(folder, tmp_path / "tuned.bin", "f32", ptuning_checkpoint=checkpoint).output
    cpp = run_cpp(cpp_python, tuned, queries=QUERIES[:1], text=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "glmtune", "chat", "--model-path", str(folder), "--ptuning-checkpoint",
                             str(checkpoint), "--greedy", "--max-new-tokens", str(NEW_TOKENS), "--query", QUERIES[0]],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == cpp["rows"][0]["text"].strip()


def _with_weights_of(export_file: Path, folder: Path, out: Path) -> Path:
    """A copy of `folder` whose weights are the values stored in `export_file` (e.g. q4_0, dequantized)."""
    from safetensors.torch import save_file

    shutil.copytree(folder, out)
    _, tensors = _read(export_file)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items() if k != PREFIX_TENSOR},
              str(out / "model.safetensors"))
    return out


# Measured on these models: 2.1 (ChatGLM2) and 0.55 (ChatGLM3).
Q4_0_VS_INT4 = 3.0


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_q4_0_export_decodes_as_glmtune_on_the_same_rounding_and_is_as_close_as_glmtune_int4(
        models, family, cpp_python, tmp_path, single_thread_own_cache):
    """ggml's q4_0 (32-value blocks, 16 levels) and glmtune's int4 (the official per-row scale, 15 levels) round
    differently, so their greedy tokens may part. What is compared instead: (1) with the same rounding, i.e. glmtune
    computing with exactly the q4_0 values of the file, the tokens are chatglm.cpp's; (2) the stated tolerance on
    logits: along chatglm.cpp's answers, the q4_0 logits are within Q4_0_VS_INT4 times glmtune int4's own distance
    from the fp32 model's logits (q4_0 also rounds the embedding and the output layer, which int4 keeps in fp16)."""
    from glmtune.inference.chat import load_chat_model

    folder, checkpoint = models[family]
    q4 = export_chatglm_cpp(folder, tmp_path / "q4.bin", "q4_0", ptuning_checkpoint=checkpoint).output
    cpp = run_cpp(cpp_python, q4)
    same = _with_weights_of(q4, folder, tmp_path / "q4-values")
    # (chatglm.cpp also rounds the activations to 8 bits inside its q4_0 products: not enough to change a token.)
    model, tokenizer = load_chat_model(same, checkpoint, device="cpu", dtype="float32")
    for row, mine in zip(cpp["rows"], glmtune_greedy(model, tokenizer)):
        assert row["prompt"] == mine["prompt"] and row["ids"] == mine["ids"]

    def logits(m):
        out = []
        for row in cpp["rows"]:
            sequence = torch.tensor([row["prompt"] + row["ids"]])
            with torch.no_grad():
                out.append(m(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0, len(row["prompt"]) - 1:])
        return torch.cat(out)

    q4_logits = logits(model)
    full = logits(load_chat_model(folder, checkpoint, device="cpu", dtype="float32")[0])
    int4 = logits(load_chat_model(folder, checkpoint, device="cpu", dtype="float32", quantization_bit=4)[0])
    q4_error, int4_error = float((q4_logits - full).abs().max()), float((int4 - full).abs().max())
    print(f"{family}: max |logits - fp32|: q4_0 {q4_error:.4f}, int4 {int4_error:.4f}, ratio {q4_error / int4_error:.2f}")
    assert 0 < q4_error <= Q4_0_VS_INT4 * int4_error, (q4_error, int4_error)
