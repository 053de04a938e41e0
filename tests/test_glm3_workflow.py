"""ChatGLM3 end to end through the real commands on a tiny ChatGLM3 (`init-model --family chatglm3`):
preprocess (conversations with a system prompt, tools and an observation), train, eval, merge, chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOLS = [{"name": "get_weather", "description": "查询城市天气",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def _glmtune(*args, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), GLMTUNE_CACHE=str(tmp_path / "cache"))
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    print(f"glmtune {args[0]}: {time.time() - started:.1f} s")
    return done


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _in_process(*args) -> str:
    """The same Typer app in this process (saves a torch import per command on a loaded 2-core machine)."""
    from typer.testing import CliRunner

    from glmtune.cli import app

    started = time.time()
    result = CliRunner().invoke(app, [str(a) for a in args])
    print(f"glmtune {args[0]} (in process): {time.time() - started:.1f} s")
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return result.output


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conversations(path: Path, n: int) -> Path:
    rows = [json.loads(line) for line in (REPO / "data" / "adgen_sample" / "train.json").open(encoding="utf-8")][:n]
    with path.open("w", encoding="utf-8") as out:
        for i, row in enumerate(rows):
            conversation = [{"role": "user", "content": row["content"]}, {"role": "assistant", "content": row["summary"]}]
            if i % 3 == 0:
                conversation.insert(0, {"role": "system", "content": "你是一位服装文案写手。"})
            record = {"conversations": conversation}
            if i % 4 == 1:  # a tool call, its observation, then the answer
                record["tools"] = TOOLS
                record["conversations"] = [
                    {"role": "user", "content": "北京天气怎么样？"},
                    {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"weather": "晴"}},
                    {"role": "assistant", "content": "北京今天晴。"},
                ]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def test_chatglm3_preprocess_train_eval_merge_and_chat_end_to_end(tmp_path):
    model = tmp_path / "glm3"
    _ok(_glmtune("init-model", model, "--family", "chatglm3", "--seq-length", "1024", tmp_path=tmp_path))
    assert json.loads((model / "config.json").read_text(encoding="utf-8"))["glmtune_family"] == "chatglm3"

    train_file = _conversations(tmp_path / "train.jsonl", 16)
    dev_file = _conversations(tmp_path / "dev.jsonl", 3)
    prep = tmp_path / "prep"
    shown = _in_process("preprocess", "--model-path", model, "--train-file", train_file, "--output-dir", prep,
                        "--max-source-length", "96", "--max-target-length", "96")
    assert "16 rows read, 16 kept" in shown

    out = tmp_path / "out"
    _in_process("train", "--model-path", model, "--dataset", prep, "--output-dir", out, "--pre-seq-len", "4",
                "--per-device-train-batch-size", "4", "--max-steps", "2", "--save-steps", "2",
                "--learning-rate", "1e-2", "--disable-tqdm")
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["glmtune_family"] == "chatglm3"

    evaluated = tmp_path / "eval"
    _in_process("eval", "--model-path", model, "--ptuning-checkpoint", checkpoint, "--test-file", dev_file,
                "--output-dir", evaluated, "--max-new-tokens", "4", "--max-source-length", "640", "--no-progress")
    predictions = [json.loads(line) for line in (evaluated / "generated_predictions.jsonl").open(encoding="utf-8")]
    references = [json.loads(line) for line in dev_file.open(encoding="utf-8")]
    # One prediction per assistant reply, scored against the reply's text (tiny vocabulary: the tool row
    # is ~540 tokens, hence the long source length).
    assert [p["labels"] for p in predictions] == [r["conversations"][-1]["content"] for r in references]
    assert all("<|user|>" not in p["predict"] and "<|observation|>" not in p["predict"] for p in predictions)

    merged = tmp_path / "merged"
    _in_process("merge", "--model-path", model, "--ptuning-checkpoint", checkpoint, "--output-dir", merged)
    assert json.loads((merged / "config.json").read_text(encoding="utf-8"))["glmtune_family"] == "chatglm3"
    # --family overrides detection: the checkpoint on the same base read as ChatGLM2 is refused, naming both.
    from typer.testing import CliRunner

    from glmtune.cli import app
    from glmtune.errors import GlmtuneError

    refused = CliRunner().invoke(app, ["merge", "--model-path", str(model), "--ptuning-checkpoint", str(checkpoint),
                                       "--output-dir", str(tmp_path / "merged2"), "--family", "chatglm2"])
    assert isinstance(refused.exception, GlmtuneError)
    assert "checkpoint of a chatglm3 model, but the base model is chatglm2" in str(refused.exception)
    assert not (tmp_path / "merged2").exists()

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS, ensure_ascii=False), encoding="utf-8")
    answer = json.loads(_ok(_glmtune("chat", "--model-path", merged, "--query", "北京天气怎么样？", "--tools", tools,
                                     "--greedy", "--max-new-tokens", "6", "--json", tmp_path=tmp_path)))
    history = answer["history"]
    assert history[0]["tools"] == TOOLS and history[1] == {"role": "user", "content": "北京天气怎么样？"}
    assert history[-1]["role"] == "assistant"



def test_train_family_option_overrides_detection_and_a_mismatched_resume_is_refused_naming_both(tmp_path):
    from typer.testing import CliRunner

    from glmtune.cli import app
    from glmtune.errors import GlmtuneError
    from glmtune.model.tiny import init_model
    from glmtune.families.tokenizer import load_tokenizer

    # A ChatGLM3 folder that says nothing about its family (like a bare official download): detected as ChatGLM2.
    model = init_model(tmp_path / "bare3", family="chatglm3", seq_length=1024)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    del config["glmtune_family"]
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (model / "tokenizer_config.json").unlink()
    assert load_tokenizer(model).family == "chatglm2"

    # Conversations without tool calls, which ChatGLM2 reads too (as sharegpt): only the model load can refuse.
    train_file = _conversations(tmp_path / "train.jsonl", 10)
    rows = [line for line in train_file.read_text(encoding="utf-8").splitlines() if '"tools"' not in line]
    train_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["train", "--model-path", model, "--train-file", train_file, "--output-dir", out, "--pre-seq-len", "4",
            "--per-device-train-batch-size", "4", "--save-steps", "2", "--learning-rate", "1e-2", "--disable-tqdm",
            "--max-source-length", "96", "--max-target-length", "96", "--report-to", "none"]
    _in_process(*args, "--max-steps", "2", "--family", "chatglm3")
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["glmtune_family"] == "chatglm3"
    assert json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["config"]["family"] == "chatglm3"
    assert load_tokenizer(checkpoint).family == "chatglm3"  # the saved tokenizer has the role tokens

    # Resuming that run as ChatGLM2 is refused with both names, and the checkpoint stays as it was.
    before = sorted(p.name for p in out.iterdir())
    refused = CliRunner().invoke(app, [str(a) for a in (*args, "--max-steps", "4", "--resume", "--family", "chatglm2")])
    assert isinstance(refused.exception, GlmtuneError), refused.output
    assert "checkpoint of a chatglm3 model, but the base model is chatglm2" in str(refused.exception)
    assert sorted(p.name for p in out.iterdir()) == before and not (out / "checkpoint-4").exists()

    unknown = CliRunner().invoke(app, [str(a) for a in (*args, "--family", "chatglm9")])
    assert isinstance(unknown.exception, GlmtuneError)
    assert "--family must be one of ['chatglm2', 'chatglm3', 'glm4'], found 'chatglm9'" in str(unknown.exception)
