"""Embeddings through the generation engine: prefill only, batched, no KV cache kept.

`Embedder` is the engine's queue of texts to embed. Each engine step takes one batch of them (right-padded
to the longest, at most `PREFILL_TOKENS` padded tokens, a longer text alone), runs the model up to its final
norm (`head=False`: no logits, no cache), pools each row over its own tokens and L2-normalises it. Causal
attention never looks right, so a row's padding changes none of its real positions. Steps still decode the
running sequences, so a large embedding request delays a stream by one batch at a time, not by all of it.

Pooling: mean over the tokens (the default, as Ollama and llama.cpp pool a plain LLaMA), the last token, the
first (cls) or the maximum, as the model's files name it (`checkpoints.pooling`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from llmasos.checkpoints.pooling import POOLINGS
from llmasos.errors import ContextLengthError, InvalidRequestError, LLMasOSError
from llmasos.models.multi_lora import Adapter, use_adapters

log = logging.getLogger(__name__)


@dataclass(eq=False)
class EmbeddingRequest:
    """Texts to embed together; `embeddings` fills in as batches finish (one fp32 [hidden] tensor per input)."""

    request_id: str
    inputs: list[list[int]]
    pooling: str
    adapter: Adapter | None = None
    on_done: Callable[[EmbeddingRequest], None] | None = None  # called on the engine's thread when finished
    embeddings: list[Tensor | None] = field(default_factory=list)
    left: int = 0
    finished: bool = False
    error: str | None = None  # why it failed or was aborted

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.inputs))


class Embedder:
    """The engine's embedding queue: `add` requests; the engine's `step` calls `step` (one batch) while there is work."""

    def __init__(self, engine, batch_tokens: int):  # engine: the `Engine` it is the queue of
        self.engine, self.batch_tokens = engine, batch_tokens  # padded tokens a batch may hold (one longer input goes alone)
        self.waiting: deque[tuple[EmbeddingRequest, int]] = deque()  # (request, input index), shortest inputs first
        self.requests: dict[str, EmbeddingRequest] = {}
        self.waiting_tokens = 0
        self._ids = itertools.count()

    def has_work(self) -> bool:
        return bool(self.waiting)

    def check(self, inputs: list[str | list[int]]) -> list[list[int]]:
        """Each input's token ids, or the error naming the first that is empty, out of the vocabulary or longer
        than the context (`input[i]`)."""
        if not inputs:
            raise InvalidRequestError("input is empty: send at least one text or list of token ids", param="input")
        vocab, context = self.engine.model.config.vocab_size, self.engine.max_seq_len
        out = []
        for i, item in enumerate(inputs):
            ids = self.engine.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not ids or (isinstance(item, str) and not item):
                raise InvalidRequestError(f"input[{i}] is empty", param=f"input[{i}]")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"input[{i}]: token ids must be integers in [0, {vocab})", param=f"input[{i}]")
            if len(ids) > context:
                raise ContextLengthError(f"input[{i}] has {len(ids)} tokens; the context holds {context}", param=f"input[{i}]")
            out.append(ids)
        return out

    def add(
        self,
        inputs: list[str | list[int]],
        pooling: str = "mean",
        adapter: Adapter | None = None,
        request_id: str | None = None,
        on_done: Callable[[EmbeddingRequest], None] | None = None,
    ) -> EmbeddingRequest:
        """Queue texts (or token id lists) to embed, all or none: checked before any is queued."""
        if pooling not in POOLINGS:
            raise InvalidRequestError(f"pooling {pooling!r} is unknown; use one of {', '.join(POOLINGS)}", param="pooling")
        if adapter is not None and adapter.retired:
            raise InvalidRequestError(f"the adapter {adapter.name!r} has been unloaded", param="model")
        ids = self.check(inputs)
        request_id = request_id or f"embd-{next(self._ids)}"
        if request_id in self.requests or request_id in self.engine.requests:
            raise LLMasOSError(f"request id {request_id!r} is already in use")
        req = EmbeddingRequest(request_id, ids, pooling, adapter, on_done, [None] * len(ids), len(ids))
        self.requests[request_id] = req
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):  # similar lengths batch with little padding
            self.waiting.append((req, i))
        self.waiting_tokens += req.prompt_tokens
        return req

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, "aborted")

    def step(self) -> None:
        """Embed one batch from the front of the queue."""
        if not self.waiting:
            return
        batch = [self.waiting.popleft()]
        longest = len(batch[0][0].inputs[batch[0][1]])
        while self.waiting:
            req, i = self.waiting[0]
            longer = max(longest, len(req.inputs[i]))
            if (len(batch) + 1) * longer > self.batch_tokens:
                break
            batch.append(self.waiting.popleft())
            longest = longer
        self.waiting_tokens -= sum(len(req.inputs[i]) for req, i in batch)
        self._run(batch)

    def _run(self, batch: list[tuple[EmbeddingRequest, int]]) -> None:
        try:
            vectors = self.embed_batch(
                [req.inputs[i] for req, i in batch], [req.pooling for req, _ in batch], [req.adapter for req, _ in batch]
            )
        except Exception as e:
            if len(batch) > 1:
                for item in batch:
                    if not item[0].finished:
                        self._run([item])
                return
            log.error("embedding request %s failed: %s: %s", batch[0][0].request_id, type(e).__name__, e, exc_info=e)
            self._finish(batch[0][0], f"{type(e).__name__}: {e}")
            return
        for (req, i), vector in zip(batch, vectors):
            if req.finished:
                continue
            req.embeddings[i] = vector
            req.left -= 1
            if req.left == 0:
                self._finish(req, None)

    @torch.inference_mode()
    def embed_batch(self, inputs: list[list[int]], poolings: list[str], adapters: list[Adapter | None]) -> Tensor:
        """[len(inputs), hidden] fp32 unit vectors on the CPU: one right-padded forward pass up to the final norm."""
        engine = self.engine
        lengths = torch.tensor([len(ids) for ids in inputs])
        ids = torch.zeros(len(inputs), int(lengths.max()), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        with use_adapters(engine.model, adapters):
            hidden = engine.model(ids.to(engine.device), head=False)
        return pool(hidden.float(), lengths.to(hidden.device), poolings).cpu()

    def _finish(self, req: EmbeddingRequest, error: str | None) -> None:
        req.error, req.finished = error, True
        self.requests.pop(req.request_id, None)
        if any(r is req for r, _ in self.waiting):
            self.waiting_tokens -= sum(len(req.inputs[i]) for r, i in self.waiting if r is req)
            self.waiting = deque(item for item in self.waiting if item[0] is not req)
        if req.on_done is not None:
            req.on_done(req)


def pool(hidden: Tensor, lengths: Tensor, poolings: list[str]) -> Tensor:
    """hidden [B, S, H] of right-padded rows with `lengths` real tokens each -> [B, H], each row pooled its own
    way and L2-normalised."""
    b, s, _ = hidden.shape
    real = torch.arange(s, device=hidden.device)[None, :] < lengths[:, None]  # [B, S]
    out = torch.empty(b, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    for mode in set(poolings):
        rows = torch.tensor([i for i, p in enumerate(poolings) if p == mode], device=hidden.device)
        h, n, mask = hidden[rows], lengths[rows], real[rows]
        if mode == "mean":
            out[rows] = (h * mask[..., None]).sum(1) / n[:, None]
        elif mode == "last":
            out[rows] = h[torch.arange(len(rows), device=h.device), n - 1]
        elif mode == "cls":
            out[rows] = h[:, 0]
        elif mode == "max":
            out[rows] = h.masked_fill(~mask[..., None], float("-inf")).amax(1)
        else:
            raise InvalidRequestError(f"pooling {mode!r} is unknown; use one of {', '.join(POOLINGS)}", param="pooling")
    return F.normalize(out, p=2.0, dim=-1)


def check_dimensions(dimensions: int | None, hidden: int) -> None:
    if dimensions is None:
        return
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= hidden:
        raise InvalidRequestError(
            f"dimensions={dimensions!r}: must be an integer from 1 to the model's {hidden}", param="dimensions"
        )


def shorten(embeddings: Tensor, dimensions: int | None) -> Tensor:
    """The first `dimensions` values of each unit vector, renormalised (as OpenAI's text-embedding-3 models
    shorten theirs, Matryoshka-style: meaningful for a model trained so); None keeps them whole."""
    check_dimensions(dimensions, embeddings.shape[-1])
    if dimensions is None or dimensions == embeddings.shape[-1]:
        return embeddings
    return F.normalize(embeddings[..., :dimensions], p=2.0, dim=-1)
