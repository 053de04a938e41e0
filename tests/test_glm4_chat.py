"""GLM-4 chat rules: prompts and reply parsing equal the official chat on the golden generations, tool calls are
parsed as JSON and never executed, and OpenAI requests map onto the template's tool block and observation turns."""

from __future__ import annotations

import json
import warnings

import pytest

from glmtune.families.glm4.chat import ToolCallWarning, parse_part
from glmtune.families.registry import GLM4, family_of
from glmtune.families.tokenizer import load_tokenizer

WEATHER = {"name": "get_weather", "description": "查询天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def tok(reference):
    return load_tokenizer(reference / "glm-4-9b-chat")


@pytest.fixture(scope="module")
def cases(reference):
    return json.loads((reference / "golden-model-glm4" / "expected-chat.json").read_text(encoding="utf-8"))["cases"]


def test_prompts_equal_the_official_chat_template_prompts(tok, cases):
    family = family_of(tok)
    assert family is GLM4 and family.stop_token_ids(tok) == [151329, 151336, 151338]
    compared = 0
    for case in cases:
        *history, last = case["messages"]
        pinned, rest = family.split_history(history, last["role"])
        _, ids = family.chat_prompt(tok, last["content"], pinned + rest, last["role"])
        if case["name"] == "special-strings-in-user-text":  # the official makes the user's strings control ids
            assert ids != case["prompt_ids"] and [i for i in ids if i >= 151329][-2:] == [151336, 151337]
            continue
        assert ids == case["prompt_ids"], case["name"]
        compared += 1
    assert compared == 24


def test_replies_parse_as_the_official_chat_without_dropping_a_last_token(tok, cases):
    family = family_of(tok)
    compared = 0
    for case in cases:
        if case["model"] != "base":  # the official `chat` on a PeftModel runs without the prefix: other tokens
            continue
        *history, last = case["messages"]
        generated = case["generated_ids"]
        if case["stop"] == "max_new_tokens":
            generated = generated[:-1]  # the official `chat` drops the last token even when no stop token ended it
        official = case["chat"]
        if "error" in official:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ToolCallWarning)
            response, new_history = family.chat_answer(tok, generated, history, last["content"], last["role"])
        assert new_history == official["history_out"], case["name"]
        if isinstance(official["response"], dict) and "parameters" in official["response"]:
            assert response == official["response"]
        else:
            assert response == official["response"], case["name"]
        compared += 1
    assert compared == 9


def test_a_tool_call_is_parsed_as_json_and_bad_arguments_come_back_as_text():
    assert parse_part('get_weather\n{"city": "北京"}')[0] == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert parse_part("\n你好 ")[0] == "你好"
    response, message, problem = parse_part("get_weather\n{city: 北京}")
    assert response == {"name": "get_weather", "content": "{city: 北京}"} and problem
    assert message == {"role": "assistant", "metadata": "get_weather", "content": "{city: 北京}"}


@pytest.mark.parametrize("reply", [
    "python\n__import__('os').system('touch PWNED')",
    "get_weather\n{\"city\": __import__('os').system('touch PWNED')}",
    "exec\n\"__import__('os').system('touch PWNED')\"",
    "get_weather\n" + "[" * 5000 + "]" * 5000,
])
def test_hostile_tool_call_replies_are_never_executed(tok, reply, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    family = family_of(tok)
    ids = tok.encode(reply, add_special_tokens=False)
    history = [{"role": "system", "content": "", "tools": [{"type": "function", "function": WEATHER}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToolCallWarning)
        response, _ = family.chat_answer(tok, ids + [151338], history, "天气", "user")
    assert isinstance(response, dict) and "parameters" not in response  # text under the tool's name, not a call
    assert family.reply_tool_call(reply, ["get_weather", "python", "exec"]) is None
    assert not (tmp_path / "PWNED").exists()


def test_serve_maps_openai_tools_calls_and_results_onto_the_template(tok):
    pytest.importorskip("fastapi")
    from glmtune.serve import protocol

    req = protocol.parse(protocol.ChatRequest, {"model": "m", "tools": [{"type": "function", "function": WEATHER}], "messages": [
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temperature\": 25}"}]})
    ids = protocol.chat_prompt_ids(tok, req, window=8192, max_tokens_cap=64)
    expected = tok.apply_chat_template([
        {"role": "system", "content": "", "tools": [{"type": "function", "function": WEATHER}]},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"北京\"}"},
        {"role": "observation", "content": "{\"temperature\": 25}"}], add_generation_prompt=True)
    assert ids == expected
    bad = protocol.parse(protocol.ChatRequest, {"model": "m", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}]},
        {"role": "tool", "content": "x"}]})
    with pytest.raises(protocol.ApiError, match="expected a JSON object") as err:
        protocol.chat_prompt_ids(tok, bad, window=8192, max_tokens_cap=64)
    assert err.value.status == 400 and err.value.param == "messages.1.tool_calls.0"


def test_serve_returns_a_reply_naming_an_offered_tool_as_a_tool_call(tok):
    pytest.importorskip("fastapi")
    from glmtune.serve import protocol

    call = tok.decode(tok.encode('get_weather\n{"city": "北京"}', add_special_tokens=False))
    assert protocol.reply_tool_call(call, ["get_weather"], tok) == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    assert protocol.reply_tool_call(call, ["other"], tok) is None  # not offered: plain content
    assert protocol.reply_tool_call("\n北京晴", ["get_weather"], tok) is None
    assert protocol.reply_tool_call("get_weather\nnot json", ["get_weather"], tok) is None
    assert protocol.may_become_tool_call("get_wea", ["get_weather"])


def test_streaming_yields_growing_text_and_the_final_answer_once(tok):
    family = family_of(tok)
    ids = tok.encode("\n你好，世界", add_special_tokens=False) + [151336]
    chunks = [[i] for i in ids]
    answers = list(family.stream_answers(tok, chunks, lambda got, warn: family.chat_answer(tok, got, [], "hi", "user", warn)))
    assert answers[-1][0] == "你好，世界" and answers[-1][1][-1] == {"role": "assistant", "metadata": "", "content": "你好，世界"}
    assert len({a[0] for a in answers}) == len(answers)  # each yield says something new


def test_opening_with_tools_wraps_plain_function_specs_for_the_template(tok):
    family = family_of(tok)
    opened = family.opening_history("be brief", [WEATHER], [])
    assert opened == [{"role": "system", "content": "be brief", "tools": [{"type": "function", "function": WEATHER}]}]
    text = tok.apply_chat_template([*opened, {"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "## get_weather" in text and text.endswith("<|system|>\nbe brief<|user|>\nhi<|assistant|>")
