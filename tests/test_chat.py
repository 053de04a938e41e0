"""`glmtune chat`: the official chat / stream_chat behaviour, history fitting, the NaN guard, and the
terminal REPL driven through a pseudo-terminal as a person would."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from glmtune.inference.chat import (
    HistoryTruncatedWarning,
    InvalidScoreLogitsProcessor,
    chat,
    load_chat_model,
    process_response,
    stream_chat,
)
from glmtune.repl import read_history_file, run_repl
from glmtune.errors import GlmtuneError
from glmtune.model.loading import load_model, save_prefix_checkpoint
from glmtune.model.tiny import init_model

GREEDY = dict(do_sample=False, max_new_tokens=8)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ChatGLM2 with tokenizer, and a P-tuning checkpoint (prefix_projection on) for it."""
    root = tmp_path_factory.mktemp("chat")
    model_dir = init_model(root / "model")
    torch.manual_seed(0)
    model = load_model(model_dir, pre_seq_len=4, prefix_projection=True)
    ckpt = root / "checkpoint-1"
    ckpt.mkdir()
    save_prefix_checkpoint(model, ckpt)
    return model_dir, ckpt


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_chat_model(*tiny, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A checkpoint written by `glmtune train` (two steps on the bundled sample, projection on)."""
    from typer.testing import CliRunner

    from glmtune.cli import app

    out = tmp_path_factory.mktemp("train") / "run"
    data = Path(__file__).resolve().parents[1] / "data" / "adgen_sample" / "train.json"
    result = CliRunner().invoke(app, [
        "train", "--model-path", str(tiny[0]), "--train-file", str(data), "--output-dir", str(out),
        "--pre-seq-len", "4", "--prefix-projection", "--max-steps", "2", "--per-device-train-batch-size", "2",
        "--max-train-samples", "4", "--max-source-length", "32", "--max-target-length", "32", "--device", "cpu",
        "--disable-tqdm", "--seed", "0",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (ckpt,) = out.glob("checkpoint-*")
    return ckpt


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, **kw)


# --- Python API --------------------------------------------------------------------------------


def test_chat_equals_the_last_value_of_stream_chat_and_appends_the_round(loaded):
    model, tok = loaded
    response, history = chat(model, tok, "你好", **GREEDY)
    steps = list(stream_chat(model, tok, "你好", **GREEDY))
    assert len(steps) == GREEDY["max_new_tokens"]  # one yield per generated token
    assert steps[-1] == (response, [("你好", response)])
    assert history == [("你好", response)]
    assert response and response == response.strip()


def test_history_enters_the_prompt_in_the_official_template(loaded):
    model, tok = loaded
    seen = []
    chat(model, tok, "第三问", [["第一问", "第一答"], ("第二问", "第二答")], on_prompt=seen.append, **GREEDY)
    (prepared,) = seen
    assert prepared.prompt == (
        "[Round 1]\n\n问：第一问\n\n答：第一答\n\n[Round 2]\n\n问：第二问\n\n答：第二答\n\n[Round 3]\n\n问：第三问\n\n答："
    )
    assert prepared.input_ids[:2] == [tok.get_command("[gMASK]"), tok.get_command("sop")]
    assert prepared.input_ids == tok(prepared.prompt)["input_ids"]
    assert prepared.dropped == 0


def test_long_history_drops_the_oldest_rounds_and_warns(loaded):
    model, tok = loaded
    history = [(f"问题{i}", "回答内容" * 10) for i in range(30)]
    seen = []
    with pytest.warns(HistoryTruncatedWarning, match=r"dropped the oldest \d+ round"):
        response, new_history = chat(model, tok, "最后", history, max_length=300, **GREEDY)
    chat(model, tok, "最后", history, max_length=300, on_prompt=seen.append, **GREEDY)
    prepared = seen[0]
    kept = len(prepared.history)
    assert 0 < kept < 30 and prepared.dropped == 30 - kept
    assert prepared.history == history[-kept:]  # the newest rounds survive
    assert len(prepared.input_ids) <= 300 - GREEDY["max_new_tokens"]
    # one more round would not have fitted
    assert len(tok(tok.build_prompt("最后", history[-kept - 1:]))["input_ids"]) > 300 - GREEDY["max_new_tokens"]
    assert new_history == history[-kept:] + [("最后", response)]


def test_short_history_is_kept_whole_without_warning(loaded):
    model, tok = loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, history = chat(model, tok, "再问", [("问", "答")], **GREEDY)
    assert history[0] == ("问", "答") and len(history) == 2


def test_query_longer_than_the_window_is_an_error(loaded):
    model, tok = loaded
    with pytest.raises(GlmtuneError, match="the query alone is"):
        chat(model, tok, "很长的问题" * 100, max_length=64, **GREEDY)


def test_invalid_score_guard_turns_nan_or_inf_rows_into_token_5_and_leaves_finite_scores_alone():
    guard = InvalidScoreLogitsProcessor()
    finite = torch.randn(2, 10)
    assert torch.equal(guard(None, finite.clone()), finite)
    for bad in (float("nan"), float("inf"), float("-inf")):
        scores = torch.randn(2, 10)
        scores[1, 3] = bad
        out = guard(None, scores)
        assert out.argmax(-1).tolist() == [5, 5] and out[0, 5].item() == 5e4 and out.sum().item() == 1e5


def test_sampling_from_nan_logits_yields_token_5_instead_of_crashing(tiny):
    model, tok = load_chat_model(tiny[0], device="cpu", dtype="float32")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    response, _ = chat(model, tok, "你好", max_new_tokens=3)  # sampling, official defaults
    assert response == process_response(tok.decode([5, 5, 5]))


def test_process_response_strips_and_fills_the_training_time_placeholder():
    assert process_response("  训练于[[训练时间]]。\n") == "训练于2023年。"


def test_closing_a_stream_stops_generation_within_a_token_or_two(loaded):
    model, tok = loaded
    steps = []

    def count_steps(input_ids, scores):
        steps.append(1)
        time.sleep(0.02)  # keep the worker from running far ahead of this consumer
        return scores

    stream = stream_chat(model, tok, "你好", do_sample=False, max_new_tokens=1500, logits_processor=[count_steps])
    next(stream)
    next(stream)
    stream.close()
    assert len(steps) <= 4  # not the 1500 it was allowed
    assert not [t for t in threading.enumerate() if t.name == "glmtune-generate"]


def test_history_file_errors_name_the_file_and_the_entry(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[["q", "a"],\n  oops]', encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"bad.json: line 2: invalid JSON"):
        read_history_file(bad_json)
    bad_pair = tmp_path / "pair.json"
    bad_pair.write_text('[["q", "a"], ["only one"]]', encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"pair.json\[1\]: expected a \[query, answer\] pair"):
        read_history_file(bad_pair)
    as_json_output = tmp_path / "out.json"
    as_json_output.write_text('{"response": "a", "history": [["q", "a"]]}', encoding="utf-8")
    assert read_history_file(as_json_output) == [("q", "a")]


def test_repl_keeps_history_clears_it_and_exits_on_ctrl_d(loaded):
    model, tok = loaded
    lines = iter(["第一问", "", "第二问", "clear", "第三问"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    final = run_repl(model, tok, read=read, out=out, err=err, debug_prompt=True, **GREEDY)
    first, _ = chat(model, tok, "第一问", **GREEDY)
    prompts = [json.loads(line.split("] ", 1)[1]) for line in err.getvalue().splitlines()]
    assert prompts == [tok.build_prompt("第一问"), tok.build_prompt("第二问", [("第一问", first)]), tok.build_prompt("第三问")]
    assert "history cleared" in out.getvalue() and out.getvalue().count("ChatGLM: ") == 3
    assert [q for q, _ in final] == ["第三问"]


# --- CLI -----------------------------------------------------------------------------------------


def test_one_shot_json_with_a_trained_checkpoint_and_history_file_matches_the_api(tiny, trained, tmp_path):
    model_dir = tiny[0]
    history = [["推荐一件衣服", "这款连衣裙简约大方"]]
    hist_file = tmp_path / "history.json"
    hist_file.write_text(json.dumps(history, ensure_ascii=False), encoding="utf-8")
    # no --pre-seq-len / --prefix-projection: they come from the checkpoint
    proc = _cli("chat", "--model-path", model_dir, "--ptuning-checkpoint", trained, "--device", "cpu", "--greedy",
                "--max-new-tokens", 8, "--query", "颜色呢", "--history-file", hist_file, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    model, tok = load_chat_model(model_dir, trained, device="cpu", dtype="float32")
    assert (model.prefix_config.pre_seq_len, model.prefix_config.prefix_projection) == (4, True)
    expected, _ = chat(model, tok, "颜色呢", history, **GREEDY)
    without_prefix, _ = chat(*load_chat_model(model_dir, device="cpu", dtype="float32"), "颜色呢", history, **GREEDY)
    assert result == {"response": expected, "history": history + [["颜色呢", expected]]}
    assert expected != without_prefix  # the checkpoint's prefix was applied


def test_chat_flags_for_one_shot_need_a_query(tiny):
    proc = _cli("chat", "--model-path", tiny[0], "--json")
    assert proc.returncode == 2 and "need --query" in proc.stderr


def _spawn(*args):
    # Only the terminal tests need pexpect: a module-level importorskip would skip every chat test.
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    return pexpect.spawn(sys.executable, ["-m", "glmtune", "chat", *map(str, args)], env=env, encoding="utf-8",
                         timeout=90, dimensions=(50, 400))


def _turn(child, query):
    """Type a query; return (prompt sent to the model, its token count, the answer as printed)."""
    child.sendline(query)
    child.expect(r"\[prompt (\d+) tokens\] ([^\r\n]*)\r\n")
    count, prompt = int(child.match.group(1)), json.loads(child.match.group(2))
    child.expect_exact("ChatGLM: ")
    child.expect_exact("User: ")
    answer = ANSI.sub("", child.before).replace("\r\n", "\n").strip("\n")
    return prompt, count, answer


def test_interactive_chat_streams_keeps_history_clears_and_stops(tiny, loaded):
    model_dir, ckpt = tiny
    model, tok = loaded
    child = _spawn("--model-path", model_dir, "--ptuning-checkpoint", ckpt, "--device", "cpu", "--greedy",
                   "--max-new-tokens", 8, "--debug-prompt")
    try:
        child.expect_exact("User: ")
        prompt1, count1, answer1 = _turn(child, "你好")
        prompt2, count2, answer2 = _turn(child, "这款裙子什么颜色")
        child.sendline("clear")
        child.expect_exact("history cleared")
        child.expect_exact("User: ")
        prompt3, _, answer3 = _turn(child, "这款裙子什么颜色")
        child.sendline("stop")
        child.expect(pytest.importorskip("pexpect").EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    expected1, history = chat(model, tok, "你好", **GREEDY)
    expected2, _ = chat(model, tok, "这款裙子什么颜色", history, **GREEDY)
    assert (prompt1, answer1) == (tok.build_prompt("你好"), expected1)
    # the second prompt carries the first round, answer included, as the official template writes it
    assert prompt2 == tok.build_prompt("这款裙子什么颜色", [("你好", answer1)])
    assert count2 == len(tok(prompt2)["input_ids"]) > count1
    assert answer2 == expected2
    assert prompt3 == tok.build_prompt("这款裙子什么颜色") and answer3 != answer2


def test_ctrl_c_stops_an_answer_but_not_the_session_and_ctrl_d_exits(tiny):
    child = _spawn("--model-path", tiny[0], "--device", "cpu", "--greedy")  # answers run to the window (~2000 tokens)
    try:
        child.expect_exact("User: ")
        child.sendline("你好")
        child.expect_exact("ChatGLM: ")
        child.expect(r"\S")  # the answer has started streaming
        child.sendintr()
        # within a few tokens, not after the ~2000 the window allows
        child.expect_exact("[stopped]", timeout=15)
        child.expect_exact("User: ", timeout=15)
        child.sendline("clear")
        child.expect_exact("history cleared")
        child.expect_exact("User: ")
        child.sendeof()
        child.expect(pytest.importorskip("pexpect").EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
