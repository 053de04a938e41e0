"""ChatGLM3 chat / stream_chat against the official goldens, and tool-call parsing that never executes model output."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from glmtune.inference.chat import chat, stream_chat
from glmtune.errors import GlmtuneError
from glmtune.families.registry import CHATGLM2, CHATGLM3
from glmtune.families.chatglm3.chat import ToolCallWarning, parse_tool_call, process_response
from glmtune.model.loading import load_model
from glmtune.families.tokenizer import load_tokenizer

STOP_IDS = {2, 64795, 64797}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a loaded 2-core machine OpenMP's waiting makes
    # main-thread generation about 10x slower (measured: 11.5 s vs 1.1 s for the 11 base chats).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def glm3(reference):
    root = reference / "golden-model-glm3"
    tokenizer = load_tokenizer(reference / "chatglm3-6b")
    models = {
        "base": load_model(root / "model", family="chatglm3"),
        "ptuning": load_model(root / "model", ptuning_checkpoint=root / "ptuning", family="chatglm3"),
        "ptuning-proj": load_model(root / "model", ptuning_checkpoint=root / "ptuning-proj", family="chatglm3"),
    }
    cases = json.loads((root / "expected-chat.json").read_text(encoding="utf-8"))["cases"]
    return tokenizer, models, cases


def _call(glm3, case):
    tokenizer, models, _ = glm3
    # The official max_length counts the prompt; glmtune by default also keeps room for the answer by
    # dropping old rounds, so the equivalent call names the answer budget the official call had.
    kwargs = dict(role=case["role"], max_length=case["max_length"], do_sample=False,
                  max_new_tokens=case["max_length"] - len(case["prompt_ids"]))
    history = json.loads(json.dumps(case["history"]))
    seen = {}
    kwargs["on_prompt"] = lambda prepared: seen.setdefault("ids", prepared.input_ids)
    method = chat if case["method"] == "chat" else stream_chat
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = method(models[case["model"]], tokenizer, case["query"], history, **kwargs)
        if case["method"] == "stream_chat":
            result = list(result)
    assert history == case["history"]  # the caller's list is not changed (the official one appends to it)
    assert seen["ids"] == case["prompt_ids"]
    return result, [w for w in caught if issubclass(w.category, ToolCallWarning)]


def _expected(tokenizer, case, ids):
    return process_response(tokenizer.decode(ids), case["history"] + [{"role": case["role"], "content": case["query"]}],
                            warn=False)


def test_chat_equals_official_greedy_results_with_and_without_prefix(glm3):
    tokenizer, _, cases = glm3
    chats = [c for c in glm3[2] if c["method"] == "chat"]
    assert len(chats) == 33 and {c["model"] for c in chats} == {"base", "ptuning", "ptuning-proj"}
    quirks = {"length": 0, "eval": 0}
    for case in chats:
        (response, history), refused = _call(glm3, case)
        generated = case["generated_ids"]
        stopped = generated[-1] in STOP_IDS and case["stop"] != "max_length"
        ours = _expected(tokenizer, case, generated[:-1] if stopped else generated)
        assert (response, history) == ours, case["name"]
        if "error" in case:
            # The official parser evals the tool call and raises; glmtune returns text and warns.
            assert case["error"].startswith("SyntaxError") and isinstance(response, str) and refused
            quirks["eval"] += 1
        elif stopped:
            assert (response, history) == (case["response"], case["history_out"]), case["name"]
        else:
            # Quirk 1: the official chat drops the last token even when the length limit cut the answer.
            assert case["stop"] == "max_length"
            assert (case["response"], case["history_out"]) == _expected(tokenizer, case, generated[:-1])
            quirks["length"] += 1
    assert quirks["length"] >= 3 and quirks["eval"] >= 3


def test_stream_chat_equals_official_streams(glm3):
    tokenizer, _, cases = glm3
    streams = [c for c in cases if c["method"] == "stream_chat"]
    first_token_stops = 0
    for case in streams:
        results, _ = _call(glm3, case)
        texts = [r[0] for r in results]
        generated = case["generated_ids"]
        if "error" in case:
            assert texts[: len(case["stream"])] == case["stream"]  # up to where the official eval raised
        elif generated[0] in STOP_IDS:
            # Quirk 2: official chat returns "" but stream_chat yields nothing; glmtune yields "" once.
            assert case["stream"] == [] and texts == [""] and results[-1] == _expected(tokenizer, case, [])
            first_token_stops += 1
        elif case["stop"] == "max_length":
            assert texts[: len(case["stream"])] == case["stream"]
            assert results[-1] == _expected(tokenizer, case, generated)  # the last token is kept
        else:
            assert texts == case["stream"], case["name"]
            assert results[-1][1] == case["history_out"]
    assert first_token_stops >= 1


def test_first_stop_token_gives_an_empty_reply_in_chat_and_stream_alike(glm3):
    case = next(c for c in glm3[2] if c["method"] == "chat" and c["generated_ids"][0] in STOP_IDS)
    (response, _), _ = _call(glm3, case)
    stream_case = {**case, "method": "stream_chat"}
    results, _ = _call(glm3, stream_case)
    assert response == case["response"] == "" and [r[0] for r in results] == [""]


TOOLS = [{"role": "system", "content": "tools", "tools": [{"name": "get_weather"}]}]


def test_tool_call_comes_back_as_a_structured_call():
    reply = "get_weather\n```python\ntool_call(city='北京', days=[1, 2], opts={'unit': 'c'}, ok=True, n=-1.5)\n```"
    response, history = process_response(reply, TOOLS + [{"role": "user", "content": "天气"}])
    assert response == {"name": "get_weather",
                        "parameters": {"city": "北京", "days": [1, 2], "opts": {"unit": "c"}, "ok": True, "n": -1.5}}
    assert history[-1] == {"role": "assistant", "metadata": "get_weather", "content": reply.split("\n", 1)[1]}
    # Without tools in the system message, metadata gives {"name", "content"} as the official code.
    assert process_response("x\nhello", [])[0] == {"name": "x", "content": "hello"}


@pytest.mark.parametrize(
    "code",
    [
        "__import__('os').system('touch PWNED')",
        "tool_call(x=__import__('os').system('touch PWNED'))",
        "tool_call(x=open('/etc/passwd').read())",
        "tool_call(**{'x': 1})",
        "tool_call(1, 2)",
        "exec('import os')",
        "tool_call(x=(lambda: 1)())",
        "tool_call(x=[i for i in range(10**9)])",
        "tool_call(x=1); import os",
        "os.system('id')",
        "tool_call(x=2**10**10)",
        "tool_call(x=f'{__import__(\"os\")}')",
        "(" * 200 + "1" + ")" * 200,
        "tool_call(x='" + "a" * 200_000 + "')",
    ],
)
def test_hostile_tool_calls_come_back_as_text_and_run_nothing(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_tool_call(code) is None
    reply = f"get_weather\n```python\n{code}\n```"
    with pytest.warns(ToolCallWarning, match="nothing executed"):
        response, history = process_response(reply, TOOLS)
    assert response == f"```python\n{code}\n```"
    assert history[-1]["content"] == response
    assert not (tmp_path / "PWNED").exists()


def test_family_registry_reads_requests_builds_prompts_and_stop_ids_for_a_server(reference):
    glm3_tok = load_tokenizer(reference / "chatglm3-6b")
    glm2_tok = load_tokenizer(reference / "chatglm2-6b")
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}]
    query, history, role = CHATGLM3.read_request(messages, None)
    assert CHATGLM3.chat_prompt(glm3_tok, query, history, role)[1] == glm3_tok.chat_input_ids("再见", messages[:3])
    assert CHATGLM3.stop_token_ids(glm3_tok) == [2, 64795, 64797]
    assert CHATGLM2.stop_token_ids(glm2_tok) == [2]
    # ChatGLM2 has no system role: the official openai_api.py puts the system text in front of the query.
    query, history, role = CHATGLM2.read_request(messages, None)
    assert (query, history, role) == ("你是助手再见", [("你好", "你好！")], "user")
    assert CHATGLM2.chat_prompt(glm2_tok, query, history)[1] == glm2_tok(glm2_tok.build_prompt(query, history))["input_ids"]


def test_repl_shows_a_tool_call_and_sends_the_next_line_back_as_the_observation(glm3, monkeypatch):
    import io

    import importlib

    from glmtune.inference import chat as chat_module
    from glmtune.inference.chat import run_repl
    from glmtune.families.registry import family_of

    tokenizer = glm3[0]
    calls = []
    call = {"name": "get_weather", "parameters": {"city": "北京"}}

    def fake_stream(model, tok, query, history, on_prompt=None, role="user", **kwargs):
        calls.append((query, role, list(history)))
        if len(calls) == 1:
            reply = call
            messages = history + [{"role": role, "content": query},
                                  {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"}]
        else:
            reply = "北京今天晴。"
            messages = history + [{"role": role, "content": query}, {"role": "assistant", "metadata": "", "content": reply}]
        yield reply, messages

    monkeypatch.setattr(chat_module, "stream_chat", fake_stream)
    start = family_of(tokenizer).opening_history(None, [{"name": "get_weather"}], [])
    lines = iter(["北京天气？", '{"weather": "晴"}', "clear", "你好"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    run_repl(None, tokenizer, read=read, out=out, err=io.StringIO(), start=start)
    assert [(q, r) for q, r, _ in calls] == [("北京天气？", "user"), ('{"weather": "晴"}', "observation"), ("你好", "user")]
    assert calls[0][2] == start and calls[2][2] == start  # `clear` goes back to the system message with tools
    assert json.dumps(call, ensure_ascii=False) in out.getvalue() and "北京今天晴。" in out.getvalue()
    with pytest.raises(GlmtuneError, match="need a ChatGLM3 model"):
        family_of(load_tokenizer(tokenizer.vocab_file, family="chatglm2")).opening_history("sys", None, [])


def test_a_long_chatglm3_history_drops_the_oldest_messages_but_keeps_the_system_prompt(glm3):
    from glmtune.inference.chat import build_chat_prompt, truncation_message

    tokenizer = glm3[0]
    system = {"role": "system", "content": "你是助手", "tools": [{"name": "f"}]}
    turns = []
    for i in range(30):
        turns += [{"role": "user", "content": f"第{i}个问题" * 5}, {"role": "assistant", "content": f"第{i}个回答" * 5}]
    prepared = build_chat_prompt(tokenizer, "最后", [system, *turns], window=300, answer_room=50)
    assert prepared.history[0] == system and prepared.dropped > 0
    assert prepared.history[1:] == turns[prepared.dropped:]
    assert len(prepared.input_ids) <= 250 < len(tokenizer.chat_input_ids("最后", [system, *turns[prepared.dropped - 1:]]))
    assert "message(s)" in truncation_message(prepared)


def test_serving_builds_chatglm3_prompts_from_roles_and_stops_on_its_stop_tokens(glm3):
    pytest.importorskip("fastapi")
    from glmtune.serve.models import stop_token_ids
    from glmtune.serve.protocol import ChatRequest, chat_prompt_ids

    tokenizer, models, _ = glm3
    req = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}]})
    ids = chat_prompt_ids(tokenizer, req, window=1024, max_tokens_cap=64)
    assert ids == tokenizer.chat_input_ids("再见", [{"role": "system", "content": "你是助手"},
                                                   {"role": "user", "content": "你好"},
                                                   {"role": "assistant", "content": "你好！"}])
    assert stop_token_ids(models["base"], tokenizer) >= {2, 64795, 64797}
