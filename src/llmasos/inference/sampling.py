"""`SamplingParams` (vLLM's names and defaults) and the sampler: penalties, filters, the draw.

Filters run on the whole batch at once with one value per row; only the final draw is per row,
because each request owns its own seeded generator (same seed, same output, whatever the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmasos.errors import InvalidRequestError
from llmasos.inference.structured import KINDS, StructuredOutputs

# A temperature below this divides logits into infinities: it is greedy (vLLM's threshold).
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 512
MAX_TOP_K = 2**31 - 1
SEEDS = 2**64  # seeds are taken modulo this (torch's generators hold 64 bits)


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k <= 0, top_p 1 and min_p 0 disable their filter.

    Every value is checked here, so the engine never meets a NaN, an infinity or an integer that overflows
    a tensor: the server and the Python API refuse the same things with the same words."""

    max_tokens: int | None = 16  # None: up to the end of the context; 0 only with prompt_logprobs (scoring)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages any token already in the prompt or output (HF/vLLM rule)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k alternatives
    prompt_logprobs: int | None = None  # as logprobs, for every prompt token after the first (vLLM's field)
    n: int = 1
    # Constrained decoding: a StructuredOutputs, or a dict of its fields ({"json": schema}, {"regex": ...}, ...)
    structured: StructuredOutputs | dict[str, Any] | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> None:
            value = repr(getattr(self, name))
            value = value if len(value) <= 60 else value[:57] + "..."
            raise InvalidRequestError(f"SamplingParams.{name}={value}: {rule}", param=name)

        def number(name: str, low: float, high: float, rule: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                bad(name, rule)  # NaN fails every comparison, so it lands here too

        def integer(name: str, low: int, high: int, rule: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                bad(name, rule)

        if self.max_tokens is not None:
            low = 0 if self.prompt_logprobs is not None else 1
            integer("max_tokens", low, 2**63 - 1, f"must be an integer of at least {low}")
        number("temperature", 0, 1e300, "must be a finite number >= 0 (0 is greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        number("min_p", 0, 1, "must be in [0, 1]")
        number("repetition_penalty", 1e-300, 1e300, "must be a finite number > 0 (1 disables it)")
        number("presence_penalty", -2, 2, "must be in [-2, 2]")
        number("frequency_penalty", -2, 2, "must be in [-2, 2]")
        integer("top_k", -(2**63), MAX_TOP_K, f"must be an integer of at most {MAX_TOP_K} (0 or less disables it)")
        if self.seed is not None:
            integer("seed", -SEEDS // 2, SEEDS - 1, "must be an integer in [-2**63, 2**64)")
        integer("n", 1, 2**63 - 1, "must be an integer of at least 1")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                integer(name, 0, MAX_LOGPROBS, f"must be between 0 and {MAX_LOGPROBS}")
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]
        if len(self.stop_strings) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop_strings):
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each")
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "must be token ids (integers >= 0)")
        if isinstance(self.structured, dict):
            unknown = sorted(set(self.structured) - set(KINDS), key=str)
            if unknown:
                bad("structured", f"unknown key {unknown[0]!r}; use one of {', '.join(KINDS)}")
            self.structured = StructuredOutputs(**self.structured)
        elif self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            bad("structured", "must be a StructuredOutputs or a dict of its fields")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_penalties(logits: Tensor, params: SamplingParams, prompt_ids: Tensor, output_ids: Tensor) -> Tensor:
    """One row's logits [V] with the repetition, presence and frequency penalties applied in place."""
    if params.repetition_penalty != 1:
        seen = torch.cat([prompt_ids, output_ids]).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids.numel():
        counts = torch.bincount(output_ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Scaled logits [B, V] with every token outside top-k, the top-p nucleus or above min-p set to -inf.

    temperature, top_p, min_p: [B] floats; top_k: [B] ints (<= 0: off). temperature must be > 0.
    """
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k < vocab).any()):
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token: keep while < top_p
        drop_sorted = before >= top_p[:, None]
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def draw(logits: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """One token per row from softmax(logits), each row with its own generator. Every row is checked before
    the first draw, so a bad row raises before any generator has moved (its neighbours can draw again alike)."""
    probs = logits.softmax(-1)
    bad = (~probs.isfinite().all(-1) | ~(probs.sum(-1) > 0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rows {bad} have no distribution to draw from (NaN, infinite or all -inf logits)")
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
