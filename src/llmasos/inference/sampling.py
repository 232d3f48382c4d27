"""`SamplingParams` (vLLM's names and defaults) and the sampler: penalties, filters, the draw.

Filters run on the whole batch at once with one value per row; only the final draw is per row,
because each request owns its own seeded generator (same seed, same output, whatever the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmasos.errors import InvalidRequestError


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k <= 0, top_p 1 and min_p 0 disable their filter."""

    max_tokens: int | None = 16  # None: up to the end of the context
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
    n: int = 1
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> None:
            raise InvalidRequestError(f"SamplingParams.{name}={getattr(self, name)!r}: {rule}", param=name)

        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be at least 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 disables it)")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.n < 1:
            bad("n", "must be at least 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be between 0 and 20")
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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
    """One token per row from softmax(logits), each row with its own generator."""
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
