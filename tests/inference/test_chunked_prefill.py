"""Chunked prefill: a token budget per step, long prompts cut into chunks between the running streams' decode
steps, with the same outputs as whole prompts. Time is the engine's steps, never the wall clock."""

import pytest
import torch
from helpers import FailingPrefill

from llmasos import LLM, SamplingParams
from llmasos.errors import LLMasOSError
from llmasos.inference.engine import Pacer

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def words(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 390, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def whole(llm):
    """The package's tiny model (128 tokens of context), prompts whole and nothing cached."""
    return LLM(llm.model, llm.tokenizer, max_batch_size=4, enable_prefix_caching=False)


def chunked(llm, budget: int, **kw) -> LLM:
    return LLM(llm.model, llm.tokenizer, max_batch_size=4, max_num_batched_tokens=budget, **kw)


@pytest.mark.parametrize("caching", [False, True])
def test_greedy_outputs_with_a_small_chunk_budget_equal_whole_prompts(llm, whole, caching):
    prompts = [words(n, seed=n) for n in (3, 90, 17, 64, 1, 40, 100, 9)]
    lengths = [20, 5, 30, 12, 25, 1, 8, 16]  # sequences leave while others are still being prefilled
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in lengths]
    expected = [whole.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    engine = chunked(llm, 6, enable_prefix_caching=caching).engine
    outs, arrivals, step = [], {0: [0, 1, 2], 1: [3], 4: [4, 5], 9: [6], 30: [7]}, 0
    while len(outs) < len(prompts) or engine.has_work():
        for i in arrivals.get(step, []):
            outs.append(engine.add(prompts[i], params[i]))
        engine.step()
        assert engine.partial is None or engine.partial.row == len(engine.running)
        step += 1
    assert [o.token_ids for o in outs] == expected
    again = engine.add(prompts[6], params[6])  # and from the cache, in chunks after the cached blocks
    engine.run([again])
    assert again.token_ids == expected[6] and again.num_cached_tokens == (96 if caching else 0)


def test_running_streams_advance_every_step_while_a_long_prompt_is_prefilled(llm, whole):
    engine = chunked(llm, 16, enable_prefix_caching=False).engine
    streams = [engine.add(words(4, seed=i), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)) for i in range(3)]
    engine.step()
    assert engine.num_running == 3
    long = engine.add(words(100, seed=7), GREEDY)
    steps = 0
    while not long.token_ids:
        before = [len(s.token_ids) for s in streams]
        engine.step()
        steps += 1
        assert [len(s.token_ids) for s in streams] == [b + 1 for b in before]  # one token each, every step
    # 16 tokens a step, 3 of them the streams': 13 of the prompt, so 100 tokens take 8 steps.
    assert steps == 8
    engine.run(streams + [long])
    assert long.token_ids == whole.generate([words(100, seed=7)], GREEDY)[0].token_ids


def test_without_a_budget_a_long_prompt_is_prefilled_in_one_step(llm):
    engine = LLM(llm.model, llm.tokenizer, max_batch_size=4).engine
    out = engine.add(words(100, seed=7), GREEDY)
    engine.step()
    assert len(out.token_ids) == 2  # its first token from the prefill, the second from the decode step


def test_prompt_logprobs_in_chunks_equal_whole(llm, whole):
    prompt = words(70, seed=12)
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=3, ignore_eos=True)
    want = whole.generate([prompt], params)[0]
    got = chunked(llm, 8).generate([prompt], params)[0]
    assert got.token_ids == want.token_ids
    assert [e.token_id for e in got.prompt_logprobs] == prompt[1:]
    assert [e.logprob for e in got.prompt_logprobs] == pytest.approx([e.logprob for e in want.prompt_logprobs], abs=1e-4)
    assert [[t for t, _ in e.top] for e in got.prompt_logprobs] == [[t for t, _ in e.top] for e in want.prompt_logprobs]


def test_n_samples_and_seeds_in_chunks(llm, whole):
    prompt, params = words(50, seed=13), SamplingParams(max_tokens=12, temperature=0.8, seed=5, n=3)
    want = [c.token_ids for c in whole.generate([prompt], params)[0].outputs]
    assert [c.token_ids for c in chunked(llm, 7).generate([prompt], params)[0].outputs] == want


def test_aborting_a_partly_prefilled_prompt_frees_its_row(llm, whole):
    engine, params = chunked(llm, 8).engine, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    stream = engine.add(words(5, seed=1), params)
    engine.step()
    long = engine.add(words(90, seed=2), GREEDY)
    engine.step()
    assert engine.partial is not None and engine.num_running == 2
    engine.abort(long.request_id)
    assert long.finished and long.finish_reason == "abort" and engine.partial is None and engine.num_running == 1
    engine.run([stream])
    assert stream.token_ids == whole.generate([words(5, seed=1)], params)[0].token_ids and not engine.has_work()


def test_a_chunk_whose_forward_raises_fails_its_request_alone(llm, whole, monkeypatch):
    engine = chunked(llm, 10).engine
    prompts = [words(30, seed=20), words(25, seed=21)]
    expected = [o.token_ids for o in whole.generate(prompts, GREEDY)]
    monkeypatch.setattr(engine, "model", FailingPrefill(engine.model, 399))  # a chunk holding 399 raises
    outs = [engine.add(prompts[0], GREEDY), engine.add(words(20, seed=22) + [399], GREEDY), engine.add(prompts[1], GREEDY)]
    engine.run(outs)
    assert [outs[0].token_ids, outs[2].token_ids] == expected
    assert "simulated failure" in outs[1].error and outs[1].token_ids == [] and not engine.has_work()


@pytest.mark.parametrize("budget", [3, "fast", 16.0, True])
def test_a_budget_neither_auto_nor_a_number_of_at_least_the_batch_size_is_refused(llm, budget):
    with pytest.raises(LLMasOSError, match=f"max_num_batched_tokens={budget!r} must be 'auto' or an integer of at least"):
        LLM(llm.model, llm.tokenizer, max_batch_size=4, max_num_batched_tokens=budget)


class TimedModel:
    """The model, each forward pass advancing a fake clock by what it would cost: `decode_ms` for a decode step,
    `fixed_ms + token_ms` per token for a prefill; records the prompt tokens of every prefill forward."""

    def __init__(self, real, decode_ms: float, fixed_ms: float, token_ms: float):
        self.real, self.now, self.prefills = real, 0.0, []
        self.decode_ms, self.fixed_ms, self.token_ms = decode_ms, fixed_ms, token_ms

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, ids, *args, **kwargs):
        if len(args) == 2 and not kwargs:  # a decode step: (tokens, positions, cache); a prefill names logits_at
            self.now += self.decode_ms / 1e3
        else:
            self.prefills.append(ids.shape[1])
            self.now += (self.fixed_ms + self.token_ms * ids.numel()) / 1e3
        return self.real(ids, *args, **kwargs)

    def clock(self) -> float:
        return self.now


def auto(llm, monkeypatch, **costs) -> tuple:
    engine = chunked(llm, "auto", enable_prefix_caching=False).engine
    model = TimedModel(engine.model, **costs)
    monkeypatch.setattr(engine, "model", model)
    engine.pacer.clock = model.clock
    return engine, model


def run_long_prompt_beside_streams(engine, model, length: int) -> tuple[list, object]:
    streams = [engine.add(words(4, seed=i), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)) for i in range(3)]
    engine.step()
    model.prefills.clear()
    long = engine.add(words(length, seed=7), GREEDY)
    while not long.token_ids:
        before = [len(s.token_ids) for s in streams]
        engine.step()
        assert [len(s.token_ids) for s in streams] == [b + 1 for b in before]
    return streams, long


def test_auto_chunks_take_about_as_long_as_the_decode_step(llm, whole, monkeypatch):
    # A decode step takes 30 ms; a chunk of t tokens 6 + t ms, as long as the decode step at t = 24.
    engine, model = auto(llm, monkeypatch, decode_ms=30, fixed_ms=6, token_ms=1)
    streams, long = run_long_prompt_beside_streams(engine, model, 100)
    chunks = model.prefills  # the streams' prefill (18 ms for 12 tokens) made the first guess 30 / 1.5 = 20
    assert chunks[0] == 20 and sum(chunks) == 100
    assert all(6 + t <= 30 for t in chunks)  # no chunk's prefill takes longer than the decode step
    assert max(chunks) > chunks[0]  # grown towards the 24 tokens that take as long (see the next test)
    engine.run(streams + [long])
    assert long.token_ids == whole.generate([words(100, seed=7)], GREEDY)[0].token_ids


def test_the_pacer_settles_where_a_chunk_takes_as_long_as_the_decode_step():
    pacer, clock = Pacer(torch.device("cpu")), [0.0]
    pacer.clock = lambda: clock[0]
    assert pacer.tokens() == Pacer.FIRST  # nothing timed yet
    for _ in range(40):
        tokens, start = pacer.tokens(), pacer.now()
        clock[0] += (6 + tokens) / 1e3  # a chunk: 6 ms, then 1 ms a token
        pacer.saw_prefill(start, tokens)
        start = pacer.now()
        clock[0] += 30 / 1e3  # the decode step
        pacer.saw_decode(start)
    assert pacer.tokens() in (23, 24)


def test_a_prefill_the_clock_cannot_see_lets_prompts_go_whole():
    pacer = Pacer(torch.device("cpu"), clock=lambda: 1.0)  # a clock too coarse: every time measured is 0
    pacer.saw_decode(pacer.now())
    pacer.saw_prefill(pacer.now(), 16)
    assert pacer.tokens() == Pacer.LEAST  # a decode step of 0 s: the least
    pacer.decode_s = 0.03
    assert pacer.tokens() > 10**6  # a prefill of 0 s: no limit in practice, and no division by zero


def test_auto_chunks_never_fall_below_the_least(llm, monkeypatch):
    engine, model = auto(llm, monkeypatch, decode_ms=5, fixed_ms=50, token_ms=1)  # the fixed cost alone is longer
    run_long_prompt_beside_streams(engine, model, 60)
    assert model.prefills == [8] * 7 + [4]  # the least, then what is left


def test_auto_with_nothing_running_prefills_a_prompt_whole(llm, monkeypatch):
    engine, model = auto(llm, monkeypatch, decode_ms=5, fixed_ms=50, token_ms=1)
    out = engine.add(words(100, seed=7), GREEDY)
    engine.step()
    assert model.prefills == [100] and len(out.token_ids) == 2
