"""Sampling filters only ever pick allowed tokens; penalties follow their published rules."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.inference.sampling import SamplingParams, apply_penalties, draw, filter_logits

VOCAB = 50


def allowed(row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The allowed set, the slow and obvious way: top-k, then top-p and min-p on the renormalised rest.

    Ties at a threshold keep every tied token, and thresholds get a little slack for float rounding.
    """
    eps = 1e-6
    probs = (row.double() / temperature).softmax(-1).tolist()
    keep = set(range(VOCAB))
    if top_k > 0:
        kth = sorted(probs, reverse=True)[min(top_k, VOCAB) - 1]
        keep = {i for i in keep if probs[i] >= kth - eps}

    def renormalised() -> dict[int, float]:
        total = sum(probs[i] for i in keep)
        return {i: probs[i] / total for i in keep}

    if top_p < 1:
        p = renormalised()
        mass, floor = 0.0, 1.0
        for i in sorted(p, key=lambda i: -p[i]):
            if mass >= top_p + eps:
                break
            mass, floor = mass + p[i], p[i]
        keep = {i for i in keep if p[i] >= floor - eps}
    if min_p > 0:
        p = renormalised()
        top = max(p.values())
        keep = {i for i in keep if p[i] >= min_p * top - eps}
    return keep


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.05, 3.0),
    top_k=st.integers(-1, 60),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 0.9),
    scale=st.floats(0.1, 10.0),
)
def test_sampled_tokens_are_always_allowed(seed, temperature, top_k, top_p, min_p, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, VOCAB, generator=g) * scale
    filtered = filter_logits(
        logits, torch.full((4,), temperature), torch.full((4,), top_k), torch.full((4,), top_p), torch.full((4,), min_p)
    )
    tokens = draw(filtered, [torch.Generator().manual_seed(seed + i) for i in range(4)])
    for row, tok in zip(logits, tokens.tolist()):
        ok = allowed(row, temperature, top_k, top_p, min_p)
        assert tok in ok
        assert ok, "a filter removed every token"
    assert torch.isfinite(filtered.max(-1).values).all(), "the most likely token is always kept"


def test_top_k_one_is_greedy():
    logits = torch.randn(3, VOCAB)
    filtered = filter_logits(logits, torch.ones(3), torch.ones(3, dtype=torch.long), torch.ones(3), torch.zeros(3))
    assert torch.equal(draw(filtered, [None] * 3), logits.argmax(-1))


def test_rows_keep_their_own_settings():
    logits = torch.zeros(2, VOCAB)
    logits[:, 0] = 5.0
    filtered = filter_logits(logits, torch.ones(2), torch.tensor([1, -1]), torch.ones(2), torch.zeros(2))
    assert torch.isinf(filtered[0, 1:]).all() and torch.isfinite(filtered[1]).all()


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(VOCAB)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, params, torch.tensor([7]), torch.tensor([3, 3, 4]))
    assert logits[3] == -(0.5 + 2 * 0.25) and logits[4] == -(0.5 + 0.25)
    assert logits[7] == 0 and logits[0] == 0  # prompt tokens are not penalised by these two


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0] + [0.0] * (VOCAB - 3))
    apply_penalties(logits, SamplingParams(repetition_penalty=2.0), torch.tensor([0]), torch.tensor([1]))
    assert logits[:3].tolist() == [1.0, -4.0, 1.0]
    assert not math.isnan(logits.sum())
