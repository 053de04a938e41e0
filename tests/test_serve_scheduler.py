"""The serving scheduler without a socket: exact greedy answers, per-row prefixes, continuous batching,
cancellation, stop strings, and the start-up checks on adapters."""

from __future__ import annotations

import importlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from glmtune.inference import chat as chat_lib
from glmtune.errors import GlmtuneError
from glmtune.model.loading import load_model, save_prefix_checkpoint
from glmtune.serve.models import load_served_models, parse_adapter_specs
from glmtune.serve.engine import Engine, run_to_completion
from glmtune.serve.request import Request, SamplingParams
from glmtune.serve.output import CHAT_RULES
from glmtune.model.tiny import init_model

QUERIES = ["你好", "这款连衣裙适合什么场合", "写一句广告词", "裤子"]


def make_adapter(model_dir, out, pre_seq_len, projection, seed):
    torch.manual_seed(seed)
    model = load_model(model_dir, pre_seq_len=pre_seq_len, prefix_projection=projection)
    with torch.no_grad():  # a fresh prefix is near zero; random values make adapters answer differently
        for param in model.prefix_encoder.parameters():
            param.normal_()
    out.mkdir(parents=True)
    save_prefix_checkpoint(model, out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model and two adapters with different pre_seq_len (4 with projection, 8 without)."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = init_model(root / "model")
    return model_dir, make_adapter(model_dir, root / "a", 4, True, 1), make_adapter(model_dir, root / "b", 8, False, 2)


@pytest.fixture(scope="module")
def served(tiny):
    model_dir, a, b = tiny
    return load_served_models(model_dir, adapters={"a": a, "b": b}, device="cpu", dtype="float32")


@pytest.fixture()
def scheduler(served):
    sched = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids, max_batch_size=8).start()
    yield sched
    sched.close()


def prompt_ids(served, query, history=()):
    window = chat_lib.context_window(served.model)
    return chat_lib.build_chat_prompt(served.tokenizer, query, list(history), window=window, answer_room=16).input_ids


def greedy(served, query, adapter, max_tokens=10, **kw):
    return dict(prompt_ids=prompt_ids(served, query), adapter=adapter,
                params=SamplingParams(max_tokens=max_tokens, temperature=0, **kw),
                postprocess=CHAT_RULES)


class Collector:
    """Records the events of one request; `done` is set on the final one."""

    def __init__(self):
        self.deltas, self.final, self.done = [], None, threading.Event()

    def __call__(self, event):
        if event.text:
            self.deltas.append(event.text)
        if event.finish_reason is not None:
            self.final = event
            self.done.set()


@pytest.mark.parametrize("adapter", ["model", "a", "b"])
def test_greedy_answer_equals_chat_token_for_token(tiny, served, scheduler, adapter):
    model_dir, a, b = tiny
    checkpoint = {"model": None, "a": a, "b": b}[adapter]
    model, tokenizer = chat_lib.load_chat_model(model_dir, checkpoint, device="cpu", dtype="float32")
    history = [("你好", "你好，我是助手")]
    expected, _ = chat_lib.chat(model, tokenizer, "写一句广告词", history, do_sample=False, max_new_tokens=12)
    ids = prompt_ids(served, "写一句广告词", history)
    reference = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    text, final, _ = run_to_completion(scheduler, dict(
        prompt_ids=ids, adapter=adapter, params=SamplingParams(max_tokens=12, temperature=0),
        postprocess=CHAT_RULES))
    assert final.token_ids == reference.tolist()
    assert text == expected
    assert final.finish_reason == "length" and final.completion_tokens == 12


def test_a_rows_tokens_do_not_depend_on_its_batch(served, scheduler):
    """Rows with different adapters and pre_seq_len (0, 4, 8) decoded together equal each decoded alone."""
    jobs = [(q, adapter) for q in QUERIES for adapter in ("model", "a", "b")]
    alone = {job: run_to_completion(scheduler, greedy(served, *job, max_tokens=8 + len(job[0])))[1].token_ids
             for job in jobs}
    collectors = {job: Collector() for job in jobs}
    for job in jobs:  # different max_tokens: rows leave at different steps while others continue
        scheduler.submit(Request(notify=collectors[job], **greedy(served, *job, max_tokens=8 + len(job[0]))))
    for job, c in collectors.items():
        assert c.done.wait(60)
        assert c.final.token_ids == alone[job], job
    assert scheduler.stats["max_batch"] == 8  # the cap
    assert scheduler.stats["mixed_steps"] > 0


def test_a_request_joins_the_running_batch_and_leaves_when_done(served, scheduler):
    long, short = Collector(), Collector()
    scheduler.submit(Request(notify=long, **greedy(served, QUERIES[0], "a", max_tokens=60)))
    deadline = time.time() + 30
    while scheduler.stats["steps"] < 3 and time.time() < deadline:
        time.sleep(0.005)
    steps_before = scheduler.stats["steps"]
    scheduler.submit(Request(notify=short, **greedy(served, QUERIES[1], "b", max_tokens=4)))
    assert short.done.wait(30)
    assert not long.done.is_set()  # the short one joined, finished and left while the long one ran on
    assert scheduler.stats["joined_running"] >= 1 and scheduler.stats["max_batch"] >= 2
    assert long.done.wait(60)
    assert long.final.completion_tokens == 60 and scheduler.stats["steps"] > steps_before
    assert short.final.token_ids == run_to_completion(scheduler, greedy(served, QUERIES[1], "b", max_tokens=4))[1].token_ids
    assert scheduler.active_rows == 0


def test_cancelling_frees_the_row_and_leaves_the_others_intact(served, scheduler):
    keep, drop = Collector(), Collector()
    expected = run_to_completion(scheduler, greedy(served, QUERIES[2], "model", max_tokens=30))[1].token_ids
    scheduler.submit(Request(notify=keep, **greedy(served, QUERIES[2], "model", max_tokens=30)))
    handle = scheduler.submit(Request(notify=drop, **greedy(served, QUERIES[3], "b", max_tokens=500)))
    deadline = time.time() + 30
    while scheduler.active_rows < 2 and time.time() < deadline:
        time.sleep(0.002)
    handle.cancel()
    assert drop.done.wait(30) and drop.final.finish_reason == "cancelled"
    assert keep.done.wait(60) and keep.final.token_ids == expected
    assert scheduler.active_rows == 0 and scheduler.stats["cancelled"] == 1


def test_stop_strings_cut_the_answer_and_are_never_streamed(served, scheduler):
    full, _, _ = run_to_completion(scheduler, greedy(served, QUERIES[1], "a", max_tokens=20))
    stop = full[5:8]
    assert len(stop) == 3 and full.find(stop) == 5, full
    text, final, deltas = run_to_completion(scheduler, greedy(served, QUERIES[1], "a", max_tokens=20, stop=(stop,)))
    assert text == full[:5] and final.finish_reason == "stop"
    assert stop not in "".join(deltas)


def test_sampling_with_a_seed_is_reproducible_whatever_the_batch(served, scheduler):
    def sampled(seed):
        return dict(prompt_ids=prompt_ids(served, QUERIES[0]), adapter="a",
                    params=SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=50, seed=seed))

    alone = run_to_completion(scheduler, sampled(7))[1].token_ids
    collectors = [Collector() for _ in range(3)]
    for c, seed in zip(collectors, (7, 8, 7)):
        scheduler.submit(Request(notify=c, **sampled(seed)))
    for c in collectors:
        assert c.done.wait(30)
    assert collectors[0].final.token_ids == alone == collectors[2].final.token_ids
    assert collectors[1].final.token_ids != alone


def test_an_unknown_adapter_is_refused_at_submit(served, scheduler):
    with pytest.raises(KeyError):
        scheduler.submit(Request(notify=lambda e: None, **greedy(served, "x", "nope")))


# --- start-up checks ---------------------------------------------------------------------------


def test_adapter_for_another_base_shape_is_refused_naming_both_values(tiny, tmp_path):
    model_dir, _, _ = tiny
    other = init_model(tmp_path / "other", layers=3)
    ckpt = make_adapter(other, tmp_path / "ckpt3", 4, False, 0)
    with pytest.raises(GlmtuneError, match=r"num_layers 3, this base has num_layers 2"):
        load_served_models(model_dir, adapters={"x": ckpt}, device="cpu", dtype="float32")
    # Without the base fields in its config.json the tensor shape still tells.
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({"pre_seq_len": cfg["pre_seq_len"]}))
    with pytest.raises(GlmtuneError, match=r"this base needs 128 \(layers 2 x 2 x groups 2 x kv_channels 16\)"):
        load_served_models(model_dir, adapters={"x": ckpt}, device="cpu", dtype="float32")


def copy_adapter(source: Path, dest: Path, **config) -> Path:
    """A copy of an adapter folder with `config` fields changed in its config.json."""
    dest.mkdir()
    for f in source.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def test_adapter_trained_on_another_family_is_refused_naming_both(tiny, tmp_path):
    model_dir, a, _ = tiny
    glm3 = copy_adapter(a, tmp_path / "glm3", glmtune_family="chatglm3")
    with pytest.raises(GlmtuneError, match=r"checkpoint of a chatglm3 model, but the base model is chatglm2"):
        load_served_models(model_dir, adapters={"g3": glm3}, device="cpu", dtype="float32")


def test_adapter_with_the_wrong_pre_seq_len_is_refused_naming_both_values(tiny, tmp_path):
    model_dir, a, _ = tiny
    bad = copy_adapter(a, tmp_path / "bad", pre_seq_len=6)
    with pytest.raises(GlmtuneError, match=r"pre_seq_len 6, the prefix weights have 4 positions"):
        load_served_models(model_dir, adapters={"bad": bad}, device="cpu", dtype="float32")


def test_adapter_specs_are_parsed_and_checked():
    assert parse_adapter_specs(["ad=/x/y", "b2=z"]) == {"ad": __import__("pathlib").Path("/x/y"),
                                                         "b2": __import__("pathlib").Path("z")}
    for bad, message in ((["nopath"], "NAME=CHECKPOINT"), (["a=x", "a=y"], "given twice"), (["bad name=x"], "must be")):
        with pytest.raises(GlmtuneError, match=message):
            parse_adapter_specs(bad)


def test_a_merged_folder_serves_its_prefix_under_the_base_name(tiny, served, tmp_path):
    from glmtune.model.merge import merge_checkpoint

    model_dir, a, _ = tiny
    merged = tmp_path / "merged"
    merge_checkpoint(model_dir, a, merged)
    alone = load_served_models(merged, device="cpu", dtype="float32")
    assert list(alone.adapters) == ["merged"] and alone.adapters["merged"].pre_seq_len == 4
    sched = Engine(alone.model, alone.tokenizer, alone.adapters, alone.stop_ids).start()
    try:
        merged_ids = run_to_completion(sched, greedy(alone, QUERIES[0], "merged"))[1].token_ids
    finally:
        sched.close()
    sched = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids).start()
    try:
        assert run_to_completion(sched, greedy(served, QUERIES[0], "a"))[1].token_ids == merged_ids
    finally:
        sched.close()


def test_ptuning_checkpoint_is_served_under_its_folder_name_and_the_base_under_served_name(tiny):
    model_dir, a, _ = tiny
    served = load_served_models(model_dir, ptuning_checkpoint=a, served_name="glm", device="cpu", dtype="float32")
    assert {n: ad.pre_seq_len for n, ad in served.adapters.items()} == {"glm": 0, "a": 4}
    with pytest.raises(GlmtuneError, match="also the base model's name"):
        load_served_models(model_dir, adapters={"glm": a}, served_name="glm", device="cpu", dtype="float32")


def test_int8_base_greedy_answer_equals_chat_with_the_same_quantization(tiny):
    model_dir, _, b = tiny
    served = load_served_models(model_dir, adapters={"b": b}, quantization_bit=8, device="cpu", dtype="float32")
    model, tokenizer = chat_lib.load_chat_model(model_dir, b, quantization_bit=8, device="cpu", dtype="float32")
    expected, _ = chat_lib.chat(model, tokenizer, QUERIES[1], do_sample=False, max_new_tokens=10)
    sched = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids).start()
    try:
        assert run_to_completion(sched, greedy(served, QUERIES[1], "b"))[0] == expected
    finally:
        sched.close()


# --- chunked prefill and the prefix cache ---------------------------------------------------------


def long_prompt(served):
    history = [("你好", "你好，我是助手"), ("这款连衣裙适合什么场合", "适合夏天的聚会和约会")]
    return prompt_ids(served, "写一句广告词", history)


def test_a_prompt_prefilled_in_chunks_between_decode_steps_answers_as_alone(served, scheduler):
    ids = long_prompt(served)
    alone = run_to_completion(scheduler, dict(prompt_ids=ids, adapter="b", params=SamplingParams(12, temperature=0)))
    engine = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids, prefill_chunk=8).start()
    try:
        running = Collector()
        engine.submit(Request(notify=running, **greedy(served, QUERIES[0], "a", max_tokens=80)))
        while engine.active_rows < 1:
            time.sleep(0.005)
        chunked = run_to_completion(engine, dict(prompt_ids=ids, adapter="b", params=SamplingParams(12, temperature=0)))
        assert running.done.wait(60) and running.final.finish_reason == "length"
    finally:
        engine.close()
    assert len(ids) > 3 * 8 and engine.stats["prefill_chunks"] >= len(ids) // 8
    assert chunked[1].token_ids == alone[1].token_ids and chunked[0] == alone[0]


def test_a_prompt_that_starts_like_a_cached_one_reuses_its_keys_and_answers_the_same(served, scheduler):
    window = chat_lib.context_window(served.model)
    system = [("你是一个广告文案助手，回答要简短，有创意。", "好的")]
    prompts = [chat_lib.build_chat_prompt(served.tokenizer, q, system, window=window, answer_room=16).input_ids
               for q in QUERIES[:3]]
    expected = {(i, a): run_to_completion(scheduler, dict(prompt_ids=p, adapter=a, params=SamplingParams(10, temperature=0)))[1].token_ids
                for i, p in enumerate(prompts) for a in ("a", "b")}
    engine = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids, prefix_cache_min=8).start()
    try:
        got = {(i, a): run_to_completion(engine, dict(prompt_ids=p, adapter=a, params=SamplingParams(10, temperature=0)))[1].token_ids
               for i, p in enumerate(prompts) for a in ("a", "b")}
    finally:
        engine.close()
    assert got == expected
    # The first prompt of each adapter fills the cache; the two others of each reuse the shared start.
    assert engine.stats["prefix_cache_hits"] == 4 and engine.stats["prefix_cache_tokens"] >= 4 * 20


# --- failure semantics ---------------------------------------------------------------------------


class Counting(Collector):
    def __init__(self, fail_at=None):
        super().__init__()
        self.finals, self.calls, self.fail_at = 0, 0, fail_at

    def __call__(self, event):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("consumer broke")
        if event.finish_reason is not None:
            self.finals += 1
        super().__call__(event)


def once(fn):
    """`fn` that raises the first time it is called, then behaves."""
    state = {"raised": False}

    def wrapper(*args, **kwargs):
        if not state["raised"]:
            state["raised"] = True
            raise RuntimeError("injected fault")
        return fn(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("where", ["prefill", "merge", "forward", "sampling", "detokenize", "notify"])
def test_a_fault_anywhere_gives_every_request_one_final_event_and_fails_only_those_concerned(served, where):
    engine = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids, max_batch_size=16).start()
    try:
        eight = []
        for i in range(8):
            c = Counting(fail_at=3 if (where == "notify" and i == 0) else None)
            params = SamplingParams(max_tokens=40, temperature=0.8 if i == 0 else 0, seed=i)
            handle = engine.submit(Request(prompt_ids=prompt_ids(served, QUERIES[i % 4]), adapter=("model", "a", "b")[i % 3],
                                           params=params, notify=c))
            state = engine._live[handle.request.id]
            if i == 0 and where == "detokenize":
                state.output.detokenizer.add = once(state.output.detokenizer.add)
            eight.append((c, state))
        if where == "sampling":  # the sampled row's sampler breaks once it exists
            deadline = time.time() + 30
            while eight[0][1].sampler is None and time.time() < deadline:
                time.sleep(0.001)
            eight[0][1].sampler.pick = once(eight[0][1].sampler.pick)
        while len(engine.runner.rows) < 8 and not any(c.done.is_set() for c, _ in eight):
            time.sleep(0.002)
        late = []
        if where in ("prefill", "merge", "forward"):
            target = {"prefill": "prefill", "merge": "merge", "forward": "decode"}[where]
            setattr(engine.runner, target, once(getattr(engine.runner, target)))
            if where != "forward":
                for q in QUERIES[:2]:
                    c = Counting()
                    engine.submit(Request(notify=c, **greedy(served, q, "a", max_tokens=5)))
                    late.append(c)
        everyone = [c for c, _ in eight] + late
        for c in everyone:
            assert c.done.wait(60), where  # every client gets its final event
        assert all(c.finals == 1 for c in everyone)
        failed = [c for c in everyone if c.final.finish_reason == "error"]
        concerned = {"prefill": late, "merge": late, "forward": [c for c, _ in eight]}.get(where, [eight[0][0]])
        assert failed == concerned, (where, [c.final.finish_reason for c in everyone])
        assert all(where in c.final.error_kind or c.final.error_kind == where for c in failed)
        assert all(c.final.finish_reason == "length" for c in everyone if c not in concerned)
        # Still serving.
        _, final, _ = run_to_completion(engine, greedy(served, QUERIES[1], "b", max_tokens=4))
        assert final.finish_reason == "length" and engine.live == 0 and engine.active_rows == 0
    finally:
        engine.close()


def test_closing_the_engine_ends_waiting_and_running_requests_with_a_final_event(served):
    engine = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids, max_batch_size=2).start()
    collectors = [Counting() for _ in range(4)]
    for c in collectors:
        engine.submit(Request(notify=c, **greedy(served, QUERIES[0], "a", max_tokens=500)))
    while engine.active_rows < 2:
        time.sleep(0.002)
    engine.close()
    assert all(c.done.is_set() and c.finals == 1 and c.final.error_kind == "shutdown" for c in collectors)


def test_a_request_past_its_deadline_ends_with_a_timeout_error_and_frees_its_row(served, scheduler):
    c = Counting()
    args = greedy(served, QUERIES[0], "a", max_tokens=100000)
    scheduler.submit(Request(notify=c, deadline=time.monotonic() + 0.5, window=0, **args))
    assert c.done.wait(30) and c.finals == 1
    assert c.final.finish_reason == "error" and c.final.error_kind == "timeout" and c.final.completion_tokens > 0
    assert scheduler.stats["timeouts"] == 1 and scheduler.active_rows == 0
