"""The engine against transformers' generate, and continuous batching against single runs."""

import pytest
import torch
from helpers import FailingPrefill

from llmasos import LLM, SamplingParams
from llmasos.errors import LLMasOSError

GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 33], [7, 8, 100, 200, 300, 12, 13, 14, 15, 16, 17], [42], [3, 4, 5, 6, 7, 8]]


def reference(ref, prompt, n=64, **kw):
    """transformers' greedy tokens, never stopping early (as ignore_eos=True)."""
    ref.generation_config.eos_token_id = None
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, **kw)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_for_one_prompt(llm, tiny):
    assert llm.generate([PROMPTS[1]], GREEDY)[0].token_ids == reference(tiny[1], PROMPTS[1])


def test_greedy_batch_of_mixed_lengths_equals_transformers(llm, tiny):
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == reference(tiny[1], prompt)
        assert out.finish_reason == "length" and len(out.token_ids) == 64


def test_repetition_penalty_equals_transformers(llm, tiny):
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, repetition_penalty=1.5)
    assert llm.generate([PROMPTS[0]], params)[0].token_ids == reference(tiny[1], PROMPTS[0], 32, repetition_penalty=1.5)


def test_continuous_batching_requests_arriving_at_different_steps(llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 390 + 5 for j in range(3 + i)] for i in range(10)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    engine = llm.engine
    outputs, arrivals = [], {0: [0, 1], 2: [2], 3: [3, 4, 5], 7: [6], 11: [7, 8], 20: [9]}
    step = 0
    while len(outputs) < len(prompts) or engine.has_work():
        for i in arrivals.get(step, []):
            outputs.append(engine.add(prompts[i], params))
        engine.step()
        step += 1
    assert [o.token_ids for o in outputs] == alone


def test_abort_frees_the_row_and_leaves_the_others_exact(llm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    outs = [llm.engine.add(p, params) for p in PROMPTS]
    for _ in range(5):
        llm.engine.step()
    llm.engine.abort(outs[1].request_id)
    assert outs[1].finished and outs[1].finish_reason == "abort" and llm.engine.num_running == 3
    llm.engine.run([outs[i] for i in (0, 2, 3)])
    assert [outs[i].token_ids for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert not llm.engine.has_work()


def test_small_batch_capacity_queues_the_rest(tiny):
    small = LLM.load(tiny[0], max_batch_size=2)
    outs = [small.engine.add(p, GREEDY) for p in PROMPTS]
    small.engine.step()
    assert small.engine.num_running == 2 and small.engine.num_waiting == 2
    small.engine.run(outs)
    big = LLM.load(tiny[0]).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in big]


def test_seed_reproduces_and_is_independent_of_the_batch(llm):
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    first = llm.generate([PROMPTS[0]], params)[0].token_ids
    batched = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], params)[1].token_ids
    assert first == batched
    other = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=1.0, seed=99))[0].token_ids
    assert other != first


def test_n_samples(llm):
    outs = llm.generate([PROMPTS[0]], SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7))
    samples = [c.token_ids for c in outs[0].outputs]
    assert len(samples) == 3 and len({tuple(s) for s in samples}) > 1
    greedy = llm.generate([PROMPTS[0]], SamplingParams(n=2, max_tokens=12, temperature=0, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == greedy[0].outputs[1].token_ids


def test_stop_token_ids_end_the_sample(llm):
    base = llm.generate([PROMPTS[1]], GREEDY)[0].token_ids
    stop = base[5]
    cut = base.index(stop)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base[: cut + 1]


def test_stop_string_is_cut_from_text_and_stream(llm):
    prompt = "Once upon a time"
    base = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].text
    stop = base[10:13]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "never-there"])
    out = llm.generate([prompt], params)[0]
    assert out.finish_reason == "stop" and out.text == base[: base.index(stop)]
    assert "".join(llm.stream(prompt, params)) == out.text


def test_streamed_deltas_concatenate_to_the_final_text(llm):
    params = SamplingParams(max_tokens=48, temperature=0.9, seed=3)
    deltas = list(llm.stream("Ünïcödé 🦙 and", params))
    assert "".join(deltas) == llm.generate(["Ünïcödé 🦙 and"], params)[0].text
    assert len(deltas) > 1


def test_logprobs_of_the_chosen_tokens(llm, tiny):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    out = llm.generate([PROMPTS[0]], params)[0]
    seq = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        ref = tiny[1](seq).logits[0, len(PROMPTS[0]) - 1 : -1].log_softmax(-1)
    for step, lp in enumerate(out.outputs[0].logprobs):
        assert lp.token_id == out.token_ids[step] == lp.top[0][0]
        assert lp.logprob == pytest.approx(float(ref[step, lp.token_id]), abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_prompt_plus_max_tokens_beyond_the_context_is_refused_before_any_work(llm):
    with pytest.raises(
        LLMasOSError,
        match=r"prompt \(100 tokens\) plus max_tokens \(64\) exceeds the context of "
        r"128 tokens; lower max_tokens to at most 28",
    ):
        llm.generate([[5] * 100], GREEDY)
    with pytest.raises(LLMasOSError, match="leaving no room"):
        llm.generate([[5] * 128], GREEDY)
    assert not llm.engine.has_work()


def test_eos_stops_by_default(llm):
    eos = llm.tokenizer.eos_id
    base = llm.generate([PROMPTS[3]], GREEDY)[0].token_ids
    # Make EOS the greedy choice by asking to stop on the first generated token's id as if it were EOS.
    out = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=64, temperature=0, stop_token_ids=[base[0]]))[0]
    assert out.token_ids == [base[0]] and out.finish_reason == "stop" and out.text == ""
    assert eos in llm.tokenizer.stop_ids


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("n", 0),
        ("min_p", 2),
        ("temperature", NAN),
        ("temperature", INF),
        ("top_p", NAN),
        ("min_p", NAN),
        ("repetition_penalty", NAN),
        ("repetition_penalty", INF),
        ("presence_penalty", NAN),
        ("frequency_penalty", -INF),
        ("top_k", 2**64),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("max_tokens", 2**64),
        ("n", 2**64),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
        ("stop", ["x"] * 17),
        ("stop", "x" * 513),
        ("stop_token_ids", [-1]),
        ("temperature", "hot"),
        ("top_k", 2.5),
    ],
)
def test_bad_sampling_params_are_named(field, value):
    with pytest.raises(LLMasOSError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


def test_prompt_logprobs_equal_transformers(llm, tiny):
    prompt = PROMPTS[1]
    with torch.no_grad():
        ref = tiny[1](torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    scored = llm.engine.prompt_logprobs(prompt, top=3)
    assert [s.token_id for s in scored] == prompt[1:]
    assert torch.allclose(
        torch.tensor([s.logprob for s in scored]), ref.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=1e-4
    )
    assert [[i for i, _ in s.top] for s in scored] == ref.topk(3).indices.tolist()
    assert llm.engine.prompt_logprobs(prompt)[0].top == []


def test_context_errors_name_the_parameter(llm):
    from llmasos.errors import ContextLengthError

    with pytest.raises(ContextLengthError) as e:
        llm.engine.add([5] * 100, SamplingParams(max_tokens=50))
    assert e.value.param == "max_tokens"
    with pytest.raises(ContextLengthError) as e:
        llm.engine.prompt_logprobs([5] * 129)
    assert e.value.param == "prompt"


def test_a_temperature_too_small_to_divide_by_is_greedy(llm):
    tiny = SamplingParams(max_tokens=16, temperature=1e-40, ignore_eos=True)
    assert llm.generate([PROMPTS[1]], tiny)[0].token_ids == llm.generate([PROMPTS[1]], GREEDY)[0].token_ids[:16]


def test_a_request_that_fails_in_sampling_fails_alone(llm):
    """The second line of defence: a value that slipped past the checks fails its own request; greedy and
    seeded neighbours in the same batch keep exactly the tokens they have alone."""
    prompts = [[(5 * i + j) % 390 + 5 for j in range(2 + i)] for i in range(8)]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(prompts, greedy)] + [llm.generate([prompts[0]], seeded)[0].token_ids]
    poisoned = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    poisoned.temperature = NAN  # past __post_init__: what a bug would let through
    engine = llm.engine
    outs = [engine.add(p, greedy) for p in prompts] + [engine.add(prompts[0], seeded)]
    bad = engine.add(prompts[1], poisoned)
    engine.run(outs + [bad])
    assert [o.token_ids for o in outs] == alone
    assert bad.finished and bad.error and bad.finish_reason == "abort" and engine.num_running == 0


def test_a_prompt_whose_prefill_raises_fails_alone(llm, monkeypatch):
    engine = llm.engine
    alone = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    monkeypatch.setattr(engine, "model", FailingPrefill(engine.model, 399))
    outs = [engine.add(p, GREEDY) for p in PROMPTS]
    bad = engine.add([5, 399, 6], GREEDY)  # admitted and prefilled together with the others
    engine.run(outs + [bad])
    assert [o.token_ids for o in outs] == alone
    assert "simulated failure" in bad.error and bad.token_ids == []
    with pytest.raises(LLMasOSError, match="simulated failure"):
        llm.generate([[5, 399, 6]], GREEDY)


def test_scoring_is_a_queued_request_that_generates_nothing(llm):
    prompt = PROMPTS[1]
    direct = llm.engine.prompt_logprobs(prompt, top=2)
    out = llm.engine.add(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert llm.engine.num_waiting == 1  # queued like any request, until a step
    llm.engine.run([out])
    assert out.token_ids == [] and out.finish_reason == "length" and out.prompt_logprobs == direct
    both = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2, ignore_eos=True))[0]
    assert [e.token_id for e in both.prompt_logprobs] == prompt[1:] and len(both.token_ids) == 4
    assert [e.logprob for e in both.prompt_logprobs] == pytest.approx([e.logprob for e in direct], abs=1e-4)
    assert both.token_ids == llm.generate([prompt], GREEDY)[0].token_ids[:4]


def test_the_cache_budget_refuses_what_never_fits_queues_what_fits_later_and_is_given_back(tiny):
    from llmasos.errors import ContextLengthError

    whole = LLM.load(tiny[0], max_batch_size=4)
    slot = whole.engine.slot_bytes
    with pytest.raises(LLMasOSError, match="cannot hold one sequence of 128 tokens"):
        LLM.load(tiny[0], max_batch_size=4, cache_budget=100 * slot)
    llm = LLM.load(tiny[0], max_batch_size=4, cache_budget=128 * slot)  # one full-context sequence
    engine = llm.engine
    assert engine.max_seq_len == 128 and engine.fit_len(2) == 0
    with pytest.raises(ContextLengthError, match="holds at most 0 tokens per sequence for n=2"):
        engine.add([5, 6], SamplingParams(max_tokens=8, n=2))
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    first, second = engine.add(PROMPTS[0], params), engine.add(PROMPTS[2], params)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1  # the second waits for room, not for a row
    engine.run([first, second])
    for prompt, out in zip([PROMPTS[0], PROMPTS[2]], [first, second]):
        assert out.token_ids == whole.generate([prompt], params)[0].token_ids
    assert engine.cache is None or engine.cache.max_len <= 256  # given back once idle
