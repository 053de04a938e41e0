"""`glmtune serve` with ChatGLM3 tools: OpenAI tools/tool_calls/tool messages -> the official prompt ids, a reply
that parses as a call -> `tool_calls` (never executed), streamed and not, through the official `openai` client."""

from __future__ import annotations

import ast
import json
import threading

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from fastapi.testclient import TestClient  # noqa: E402

from glmtune.serve import protocol  # noqa: E402
from glmtune.serve.api import create_app  # noqa: E402
from glmtune.serve.protocol import ApiError, ChatRequest, chat_prompt_ids, reply_tool_call  # noqa: E402
from glmtune.serve.scheduler import Event  # noqa: E402
from glmtune.families.chatglm3.chat import DEFAULT_TOOLS_SYSTEM  # noqa: E402
from glmtune.families.tokenizer import load_tokenizer  # noqa: E402

WEATHER = {"name": "get_weather", "description": "查询指定城市的实时天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def glm3_tok(reference):
    return load_tokenizer(reference / "chatglm3-6b")


def golden_chat_rows(reference):
    rows = [json.loads(line) for line in (reference / "chatglm3-tokenizer-golden.jsonl").open(encoding="utf-8")]
    return [r for r in rows if r.get("method") == "build_chat_input"]


def to_openai(history: list[dict], query: str, role: str) -> tuple[list[dict], list | None] | None:
    """The official history in OpenAI's shape, or None where OpenAI cannot say it (e.g. a non-tool_call call)."""
    messages, tools = [], None
    for m in history + [{"role": role, "content": query}]:
        if m["role"] == "system" and "tools" in m:
            tools = [{"type": "function", "function": t} for t in m["tools"]]
            messages.append({"role": "system", "content": m["content"]})
        elif m["role"] == "assistant" and m.get("metadata"):
            code = m["content"].strip().removeprefix("```python\n").removesuffix("\n```")
            call = ast.parse(code, mode="eval").body
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "tool_call"):
                return None
            args = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": m["metadata"], "arguments": json.dumps(args, ensure_ascii=False)}}]})
        elif m["role"] == "observation":
            messages.append({"role": "tool", "tool_call_id": "call_1", "content": m["content"]})
        elif m["role"] in ("system", "user", "assistant") and not m.get("metadata"):
            messages.append({"role": m["role"], "content": m["content"]})
        else:
            return None
    return messages, tools


def test_tools_tool_calls_and_tool_results_give_the_official_build_chat_input_ids(reference, glm3_tok):
    matched = 0
    for row in golden_chat_rows(reference):
        converted = to_openai(row["history"], row["query"], row["role"])
        if converted is None or row["role"] not in ("user", "observation"):
            continue
        messages, tools = converted
        body = {"model": "m", "messages": messages}
        if tools is not None:
            body["tools"] = tools
        req = protocol.parse(ChatRequest, body)
        assert chat_prompt_ids(glm3_tok, req, window=8192, max_tokens_cap=64) == row["input_ids"], row["query"]
        matched += "tools" in json.dumps(row["history"])
    assert matched >= 4  # tools on the system message, a tool call, an observation query, a reply after it


def test_tools_without_a_system_message_get_the_official_default_one(glm3_tok):
    req = protocol.parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "北京天气？"}],
                                       "tools": [{"type": "function", "function": WEATHER}]})
    system = {"role": "system", "content": "Answer the following questions as best as you can. You have access to "
              "the following tools:", "tools": [WEATHER]}
    assert chat_prompt_ids(glm3_tok, req, window=8192, max_tokens_cap=64) == glm3_tok.chat_input_ids("北京天气？", [system])


@pytest.mark.parametrize("change, param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "user", "content": "x"}]}, "messages.0.tool_calls.0"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a b": 1}'}}]},
        {"role": "user", "content": "x"}]}, "messages.0.tool_calls.0"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
])
def test_malformed_tool_fields_are_a_400_naming_the_field(glm3_tok, change, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(ApiError) as err:
        chat_prompt_ids(glm3_tok, protocol.parse(ChatRequest, body), window=8192, max_tokens_cap=64)
    assert err.value.status == 400 and err.value.param == param


def test_chatglm2_refuses_tools_and_tool_messages_with_a_400(reference):
    tok = load_tokenizer(reference / "chatglm2-6b")
    for body in ({"tools": [{"type": "function", "function": WEATHER}]},
                 {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "c", "content": "1"}, {"role": "user", "content": "x"}]}):
        req = protocol.parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})
        with pytest.raises(ApiError, match="ChatGLM3") as err:
            chat_prompt_ids(tok, req, window=8192, max_tokens_cap=64)
        assert err.value.status == 400


def assistant_reply_ids(tok, metadata: str, message: str) -> list[int]:
    """What the model generates after `<|assistant|>`: the official single message without its role token."""
    return tok.build_single_message("assistant", metadata, message)[1:]


def test_a_reply_that_parses_as_a_call_of_an_offered_tool_becomes_a_tool_call(glm3_tok, tmp_path):
    call = " ```python\ntool_call(city='北京', days=3, detail=True, extra=None)\n```"
    raw = glm3_tok.decode(assistant_reply_ids(glm3_tok, "get_weather", call))
    assert reply_tool_call(raw, ["get_weather"], glm3_tok) == {
        "name": "get_weather", "arguments": '{"city": "北京", "days": 3, "detail": true, "extra": null}'}
    assert reply_tool_call(raw, ["other_tool"], glm3_tok) is None  # a tool the request did not offer: plain content
    plain = glm3_tok.decode(assistant_reply_ids(glm3_tok, "", "get_weather\n北京今天晴。"))
    assert reply_tool_call(plain, ["get_weather"], glm3_tok) is None  # blank metadata line: text, whatever it says
    hostile = (f" ```python\ntool_call(city=__import__('os').system('touch {tmp_path}/PWNED'))\n```",
               " ```python\nprint(open('/etc/passwd').read())\n```", " ```python\ntool_call(x={1, 2})\n```")
    for code in hostile:
        assert reply_tool_call(glm3_tok.decode(assistant_reply_ids(glm3_tok, "get_weather", code)), ["get_weather"], glm3_tok) is None
    assert not (tmp_path / "PWNED").exists()


def test_while_streaming_only_a_reply_starting_like_a_tool_name_is_held(glm3_tok):
    names = ["get_weather"]
    assert protocol.may_become_tool_call("get_w", names)
    assert protocol.may_become_tool_call("get_weather\n ```py", names)
    assert not protocol.may_become_tool_call("北京", names)
    assert not protocol.may_become_tool_call("get_weathers", names)


class ReplayScheduler:
    """Stands in for the model: replays the given reply ids in small deltas, as the scheduler notifies them.

    A tool call from random tiny weights is too rare to wait for; the HTTP layer under test is the real one.
    """

    def __init__(self, tokenizer, reply_ids: list[int]):
        self.tokenizer, self.reply_ids, self.stop_ids = tokenizer, reply_ids, frozenset({2, 64795, 64797})
        self.active_rows, self.stats, self.prompts = 0, {}, []

    def submit(self, request):
        self.prompts.append(request.prompt_ids)

        def run():
            ids = self.reply_ids + [64795]
            sent = ""
            for n in range(1, len(self.reply_ids) + 1):
                text = request.postprocess(self.tokenizer.decode(self.reply_ids[:n]))
                if text.startswith(sent) and len(text) > len(sent):
                    request.notify(Event(text=text[len(sent):]))
                    sent = text
            request.notify(Event(finish_reason="stop", prompt_tokens=len(request.prompt_ids),
                                 completion_tokens=len(ids), token_ids=ids))

        threading.Thread(target=run, daemon=True).start()

        class _Handle:
            def cancel(self):
                pass
        return _Handle()


class _Served:
    def __init__(self, tokenizer, model):
        self.tokenizer, self.model, self.adapters, self.base_name = tokenizer, model, {"glm3": None}, "glm3"


def openai_client(tok, reply_ids):
    import types

    model = types.SimpleNamespace(chatglm_config={"seq_length": 1024})
    scheduler = ReplayScheduler(tok, reply_ids)
    app = create_app(_Served(tok, model), scheduler, max_new_tokens=64, max_length=1024)
    http = TestClient(app, base_url="http://testserver")
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http), scheduler


TOOLS = [{"type": "function", "function": WEATHER}]
ASK = [{"role": "user", "content": "北京天气？"}]
CALL = " ```python\ntool_call(city='北京')\n```"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_gets_a_tool_call_with_finish_reason_tool_calls(glm3_tok, stream):
    client, scheduler = openai_client(glm3_tok, assistant_reply_ids(glm3_tok, "get_weather", CALL))
    if stream:
        chunks = list(client.chat.completions.create(model="glm3", messages=ASK, tools=TOOLS, stream=True))
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # nothing of the call leaked as text
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        reply = client.chat.completions.create(model="glm3", messages=ASK, tools=TOOLS)
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        calls = reply.choices[0].message.tool_calls
        # the README's loop: the client's own message object goes back with the tool's result
        client.chat.completions.create(model="glm3", tools=TOOLS, messages=ASK + [
            reply.choices[0].message, {"role": "tool", "tool_call_id": calls[0].id, "content": "25"}])
        history = [{"role": "system", "content": DEFAULT_TOOLS_SYSTEM, "tools": [WEATHER]}, ASK[0],
                   {"role": "assistant", "metadata": "get_weather", "content": CALL}]
        assert scheduler.prompts[1] == glm3_tok.chat_input_ids("25", history, "observation")
        del scheduler.prompts[1]
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "北京"}
    system = {"role": "system", "content": DEFAULT_TOOLS_SYSTEM, "tools": [WEATHER]}
    assert scheduler.prompts == [glm3_tok.chat_input_ids("北京天气？", [system])]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("metadata, message", [
    ("", "北京今天晴，气温25度。"),  # a plain reply
    ("get_weather", " ```python\ntool_call(city=__import__('os').getcwd())\n```"),  # not a literal call
    ("get_forecast", CALL),  # a tool the request did not offer
])
def test_other_replies_come_back_as_plain_content_streamed_or_not(glm3_tok, stream, metadata, message):
    ids = assistant_reply_ids(glm3_tok, metadata, message)
    client, _ = openai_client(glm3_tok, ids)
    expected = glm3_tok.decode(ids).strip()
    if stream:
        chunks = list(client.chat.completions.create(model="glm3", messages=ASK, tools=TOOLS, stream=True))
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
        if not metadata:  # a plain reply is streamed as it comes, not held to the end
            assert sum(bool(c.choices[0].delta.content) for c in chunks) > 1
    else:
        reply = client.chat.completions.create(model="glm3", messages=ASK, tools=TOOLS)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert reply.choices[0].message.tool_calls is None
    assert (text, finish) == (expected, "stop")


def test_a_tool_result_is_answered_as_the_observation_turn(glm3_tok):
    client, scheduler = openai_client(glm3_tok, assistant_reply_ids(glm3_tok, "", "北京今天晴。"))
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 25}'}]
    reply = client.chat.completions.create(model="glm3", messages=messages, tools=TOOLS)
    assert reply.choices[0].message.content == "北京今天晴。"
    system = {"role": "system", "content": DEFAULT_TOOLS_SYSTEM, "tools": [WEATHER]}
    history = [system, {"role": "user", "content": "北京天气？"},
               {"role": "assistant", "metadata": "get_weather", "content": CALL}]
    assert scheduler.prompts == [glm3_tok.chat_input_ids('{"temperature": 25}', history, "observation")]


def test_real_chatglm3_server_takes_tools_and_tool_results_from_the_openai_client(tmp_path):
    """End to end on a tiny `init-model --family chatglm3`: random weights rarely call a tool, so this checks that
    the conversation goes through and that the streamed and non-streamed greedy replies agree."""
    from test_serve_api import start_server

    from glmtune.model.tiny import init_model

    model_dir = init_model(tmp_path / "m", family="chatglm3")
    proc, url = start_server(["--model-path", str(model_dir), "--device", "cpu", "--dtype", "float32",
                              "--max-new-tokens", "24", "--max-length", "512"], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 25}'}]
        for conversation in (ASK, messages):
            kwargs = dict(model=client.models.list().data[0].id, messages=conversation, tools=TOOLS, temperature=0)
            reply = client.chat.completions.create(**kwargs).choices[0]
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            streamed_calls = [tc.function.name for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
            assert reply.finish_reason == chunks[-1].choices[0].finish_reason
            if reply.message.tool_calls:
                assert reply.finish_reason == "tool_calls" and reply.message.content is None
                assert streamed_calls == [reply.message.tool_calls[0].function.name]
            else:
                assert reply.finish_reason in ("stop", "length") and not streamed_calls
                assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.message.content
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in (tmp_path / "server.log").read_text()
