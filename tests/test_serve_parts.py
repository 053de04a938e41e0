"""The serving engine's parts alone, without threads, sockets or a model where none is needed: the sampler
against transformers' warpers, the output processor (incremental text, stop strings, split characters,
finish reasons), the scheduler's plans, and the prefix cache."""

from __future__ import annotations

import random

import pytest
import torch

from glmtune.inference import chat as chat_lib
from glmtune.serve.output import CHAT_RULES, IncrementalDetokenizer, RequestOutput, TextRules, TextStream
from glmtune.serve.request import Request, SamplingParams
from glmtune.serve.runner import PrefixCache
from glmtune.serve.sampler import RowSampler, sample
from glmtune.serve.scheduler import QueueFull, Scheduler


# --- sampler -------------------------------------------------------------------------------------


def test_a_row_with_non_finite_logits_gets_the_official_guard_token_and_its_neighbours_do_not():
    """Batched pick: inf or NaN rows answer INVALID_SCORE_TOKEN (as chat's InvalidScoreLogitsProcessor), finite
    rows their own argmax, a finite row with an overflowing sum its argmax too (the exact test decides)."""
    samplers = [RowSampler(SamplingParams(max_tokens=5, temperature=0), "cpu") for _ in range(4)]
    logits = torch.zeros(4, 100)
    logits[0, 7] = 1.0
    logits[1, 3] = float("inf")
    logits[2, 5] = float("nan")
    logits[3, :] = 3e38
    logits[3, 11] = 3.3e38
    guard = chat_lib.INVALID_SCORE_TOKEN
    assert sample(samplers, logits) == [7, guard, guard, 11]


def kept_tokens(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """Tokens a sampler can draw: those the warpers leave finite."""
    scores = RowSampler(params, "cpu").warpers(None, logits[None].clone())
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def test_top_k_and_top_p_keep_exactly_the_tokens_generate_keeps():
    # Probabilities after softmax: 0.4, 0.3, 0.15, 0.1, 0.05 (tokens 0..4).
    logits = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()
    assert kept_tokens(logits, SamplingParams(1, temperature=1.0, top_k=3)) == {0, 1, 2}
    assert kept_tokens(logits, SamplingParams(1, temperature=1.0, top_k=0)) == {0, 1, 2, 3, 4}
    # top_p 0.7: 0.4 + 0.3 reaches it, so the token that crosses it is the last kept (transformers' rule).
    assert kept_tokens(logits, SamplingParams(1, temperature=1.0, top_p=0.7)) == {0, 1}
    assert kept_tokens(logits, SamplingParams(1, temperature=1.0, top_p=0.71)) == {0, 1, 2}
    assert kept_tokens(logits, SamplingParams(1, temperature=1.0, top_p=0.8, top_k=2)) == {0, 1}


def test_sampled_rows_follow_transformers_warpers_with_the_same_seed():
    """Row for row: our draw equals softmax(warped) + multinomial with a generator seeded the same way."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    params = [SamplingParams(1, temperature=0.7, top_k=50, top_p=0.9, seed=1),
              SamplingParams(1, temperature=1.3, top_k=0, top_p=0.5, seed=2),
              SamplingParams(1, temperature=0.9, top_k=5, top_p=1.0, seed=2**70 % 2**63)]
    samplers = [RowSampler(p, "cpu") for p in params]
    ours = [sample(samplers, logits) for _ in range(20)]
    for i, p in enumerate(params):
        generator = torch.Generator().manual_seed(p.seed % 2**64)
        expected = []
        for _ in range(20):
            scores = TemperatureLogitsWarper(p.temperature)(None, logits[i:i + 1].clone())
            if p.top_k:
                scores = TopKLogitsWarper(p.top_k)(None, scores)
            if p.top_p < 1:
                scores = TopPLogitsWarper(p.top_p)(None, scores)
            expected.append(int(torch.multinomial(scores.softmax(-1), 1, generator=generator)))
        assert [o[i] for o in ours] == expected


def test_a_huge_seed_is_folded_into_the_generators_range():
    a = RowSampler(SamplingParams(1, temperature=1.0, seed=2**63 - 1), "cpu")
    b = RowSampler(SamplingParams(1, temperature=1.0, seed=-(2**63)), "cpu")
    assert a.generator.initial_seed() == 2**63 - 1 and b.generator.initial_seed() == 2**63


# --- output processor ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from glmtune.families.tokenizer import load_tokenizer
    from glmtune.model.tiny import init_model

    return load_tokenizer(init_model(tmp_path_factory.mktemp("parts") / "model"))


class CountingTokenizer:
    """Counts the ids each decode call gets (the text cost of a step)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids)


TEXTS = ["你好，我是助手。这款连衣裙适合夏天穿着，颜色是蓝色的 😀。", "hello world, 天气 [[训练时间]] ok  ",
         "  前导空格 and trailing \n", "emoji 🎉🎉 und Ümläute ✓ 𝔘𝔫𝔦"]


def test_incremental_text_equals_decoding_the_whole_answer_and_never_sends_a_split_character(tok):
    rng = random.Random(0)
    cases = [tok(t)["input_ids"][2:] for t in TEXTS]  # the answer's ids, without [gMASK] sop
    cases += [[rng.randrange(3, tok.vocab_size) for _ in range(60)] for _ in range(30)]
    for ids in cases:
        detok = IncrementalDetokenizer(tok)
        parts = [detok.add(t) for t in ids]
        parts.append(detok.flush())
        assert "".join(parts) == tok.decode(ids), ids
        full = tok.decode(ids)
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in parts)


def test_a_character_split_across_byte_tokens_is_held_until_complete(tok):
    ids = tok("😀")["input_ids"][2:]
    assert len(ids) > 1  # the tiny vocabulary spells the emoji in byte pieces
    detok = IncrementalDetokenizer(tok)
    parts = [detok.add(t) for t in ids]
    assert parts[:-1] == [""] * (len(ids) - 1) and parts[-1].endswith("😀")


def test_a_steps_text_cost_does_not_grow_with_the_answer(tok):
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    ids = tok("这款连衣裙适合夏天穿着。" * 80)["input_ids"][2:]
    for t in ids:
        detok.add(t)
    assert len(ids) > 500 and max(counting.sizes) <= 8


def stream_pieces(text: str, rules, stop=(), seed=0) -> tuple[str, bool]:
    rng = random.Random(seed)
    stream, out, i = TextStream(rules, stop), [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        sent, hit = stream.feed(text[i:i + n])
        out.append(sent)
        if hit:
            return "".join(out), True
        i += n
    sent, hit = stream.feed("", final=True)
    return "".join(out) + sent, hit


def test_streamed_post_processing_equals_the_official_one_on_the_whole_text():
    rng = random.Random(1)
    alphabet = [" ", "\n", "a", "好", "[[训练时间]]", "[[", "]]", "[", "训练"]
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for k, text in enumerate(texts):
        assert CHAT_RULES(text) == chat_lib.process_response(text)
        assert stream_pieces(text, CHAT_RULES, seed=k) == (chat_lib.process_response(text), False), repr(text)


def test_stop_strings_spanning_pieces_cut_the_text_and_are_never_sent():
    rng = random.Random(2)
    for k in range(200):
        text = "".join(rng.choice("abc好 ") for _ in range(rng.randint(1, 25)))
        stop = ("bca", "好好")
        cut = min([i for i in (text.find(s) for s in stop) if i >= 0], default=-1)
        expected = (text[:cut], True) if cut >= 0 else (text, False)
        assert stream_pieces(text, TextRules(), stop, seed=k) == expected, (text, stop)


def out_for(tok, max_tokens, stop_ids=frozenset({2}), **kw):
    request = Request([1, 2, 3], "a", SamplingParams(max_tokens=max_tokens, temperature=0, **kw), lambda e: None,
                      postprocess=CHAT_RULES)
    return RequestOutput(request, tok, stop_ids)


def test_a_first_token_that_is_a_stop_token_ends_the_answer_empty(tok):
    events = out_for(tok, 10).add(2)
    assert len(events) == 1 and events[0].finish_reason == "stop"
    assert events[0].text == "" and events[0].completion_tokens == 1 and events[0].token_ids == [2]


def test_max_tokens_1_ends_after_the_first_token_with_length(tok):
    token = tok("好")["input_ids"][-1]
    events = out_for(tok, 1).add(token)
    assert [e.finish_reason for e in events] == [None, "length"] and events[0].text == "好"
    assert events[-1].completion_tokens == 1 and events[-1].prompt_tokens == 3


def test_the_first_token_sends_an_event_even_without_text(tok):
    events = out_for(tok, 10).add(tok(" ")["input_ids"][-1])  # blank: stripped, held
    assert len(events) == 1 and events[0].text == "" and events[0].finish_reason is None


# --- scheduler -----------------------------------------------------------------------------------


def req(n_tokens=10, adapter="a"):
    return Request(list(range(3, 3 + n_tokens)), adapter, SamplingParams(max_tokens=5, temperature=0), lambda e: None)


def test_the_plan_prefills_together_up_to_the_batch_cap_and_the_queue_is_bounded():
    s = Scheduler(max_batch_size=3, max_queue=4)
    requests = [req() for _ in range(4)]
    for r in requests:
        s.add(r)
    with pytest.raises(QueueFull):
        s.add(req())
    plan = s.schedule()
    assert plan.prefill == requests[:3] and not plan.decode and not plan.chunks
    for r in plan.prefill:
        s.joined(r)
    plan = s.schedule()
    assert plan.decode and plan.prefill == []  # the batch is full: the 4th waits
    s.finished(requests[0])
    assert s.schedule().prefill == [requests[3]]


def test_a_long_prompt_is_chunked_while_rows_decode_and_goes_in_whole_when_none_do():
    s = Scheduler(max_batch_size=8, prefill_chunk=100)
    running, long = req(), req(250)
    s.add(running)
    s.joined(s.schedule().prefill[0])
    s.add(long)
    done = {"n": 0}
    s.cached_tokens = lambda r: done["n"] if r is long else 0
    ends = []
    while True:
        plan = s.schedule()
        assert plan.decode  # the running row decodes every step
        (r, end), = plan.chunks
        ends.append(end)
        done["n"] = end
        if end == 250:
            s.joined(r)
            break
    assert ends == [100, 200, 250]
    idle = Scheduler(prefill_chunk=100)
    idle.add(req(250))
    (r, end), = idle.schedule().chunks
    assert end == 250


def test_cancelled_and_timed_out_requests_leave_in_the_plan():
    now = [0.0]
    s = Scheduler(clock=lambda: now[0])
    a, b, c = req(), req(), req()
    b.deadline = 5.0
    for r in (a, b, c):
        s.add(r)
    a.cancelled = True
    now[0] = 6.0
    plan = s.schedule()
    assert plan.leave == [(a, "cancelled"), (b, "timeout")] and plan.prefill == [c]


# --- prefix cache --------------------------------------------------------------------------------


def kv(n, value=1.0):
    return [(torch.full((1, 2, n, 4), value), torch.full((1, 2, n, 4), -value))]


def test_the_prefix_cache_reuses_the_longest_start_per_adapter_and_keeps_one_token_to_compute():
    cache = PrefixCache(max_tokens=100, min_tokens=4)
    cache.add("a", list(range(10)), kv(10))
    assert cache.lookup("b", list(range(10)))[0] == 0  # another adapter's keys are not this one's
    n, layers = cache.lookup("a", list(range(10)))
    assert n == 9 and layers[0][0].shape[2] == 9
    assert cache.lookup("a", list(range(6)) + [99, 98])[0] == 6
    assert cache.lookup("a", [0, 1, 2, 99])[0] == 0  # under min_tokens


def test_the_prefix_cache_drops_the_least_recently_used_past_its_size():
    cache = PrefixCache(max_tokens=25, min_tokens=4)
    cache.add("a", list(range(10)), kv(10))
    cache.add("a", list(range(100, 110)), kv(10))
    cache.lookup("a", list(range(10)) + [5])  # used: the other one is now the oldest
    cache.add("a", list(range(200, 210)), kv(10))
    assert len(cache) == 2 and cache.lookup("a", list(range(100, 110)) + [1])[0] == 0
    assert cache.lookup("a", list(range(10)) + [5])[0] == 10
