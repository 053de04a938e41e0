"""`--quantization-bit` through the real commands: train a prefix through an int4 model, eval and chat with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data" / "adgen_sample" / "train.json"
DEV_FILE = REPO / "data" / "adgen_sample" / "dev.json"


def _glmtune(*args, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), GLMTUNE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("bits", [4])
def test_train_eval_and_chat_through_a_quantized_base_model(tmp_path, bits):
    from glmtune.model.tiny import init_model

    model = init_model(tmp_path / "model")
    out = tmp_path / "run"
    _glmtune("train", "--model-path", model, "--train-file", TRAIN_FILE, "--output-dir", out, "--pre-seq-len", 4,
             "--quantization-bit", bits, "--per-device-train-batch-size", 4, "--max-steps", 3,
             "--logging-steps", 1, "--disable-tqdm", tmp_path=tmp_path)
    ckpt = out / "checkpoint-3"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # The checkpoint holds only the prefix: the quantized base is not saved in it.
    state = load_file(ckpt / "model.safetensors")
    assert set(state) == {"transformer.prefix_encoder.embedding.weight"}
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_bit" not in config and config["pre_seq_len"] == 4

    _glmtune("eval", "--model-path", model, "--ptuning-checkpoint", ckpt, "--test-file", DEV_FILE,
             "--output-dir", tmp_path / "eval", "--quantization-bit", bits, "--max-samples", 8,
             "--max-new-tokens", 8, "--no-progress", tmp_path=tmp_path)
    results = json.loads((tmp_path / "eval" / "predict_results.json").read_text())
    assert results["predict_samples"] == 8

    answer = _glmtune("chat", "--model-path", model, "--ptuning-checkpoint", ckpt, "--quantization-bit", bits,
                      "--greedy", "--max-new-tokens", 8, "--query", "类型#裙*颜色#白色", "--json", tmp_path=tmp_path)
    reply = json.loads(answer.stdout)
    assert set(reply) == {"response", "history"} and reply["history"][-1][0] == "类型#裙*颜色#白色"
