"""The generation engine: continuous batching over a preallocated KV cache.

Requests wait in a queue; between decode steps they are admitted while cache rows are free
(each is prefilled into its own row), and finished or cancelled ones leave. The running
sequences always occupy rows 0..n-1: when one leaves, the last row is copied into its place, so
every decode step is a single batched forward on a contiguous slice of the cache.

Chunked prefill: with `max_num_batched_tokens` (vLLM's name), a step computes at most that many tokens,
one per running sequence first and then what is left of the budget of waiting prompts, in order; a prompt
that does not fit is cut, and its next chunk goes first in the next step. At most one prompt is partly
prefilled between steps; it holds the row right after the running ones. A long prompt then delays every
stream by a chunk a step instead of stalling them all for its whole prefill. Prompts only scored
(max_tokens=0) take no row and are scored whole, in a step of their own when longer than the budget.
`max_num_batched_tokens="auto"` sizes the chunks by time instead of tokens (`Pacer`): what a fixed budget
costs differs several-fold between CPUs.

Automatic prefix caching (`prefix_cache.py`): the KV of every prompt, and of every answer when its
sequence ends, is kept in blocks outside the rows; a new prompt that starts with cached blocks has them
copied into its row and computes only the rest (`RequestOutput.num_cached_tokens`). The blocks take what
the KV budget leaves beside the rows and are evicted, least recently used first, before the rows grow.

Texts to embed wait in the engine's `Embedder` (`embedding.py`): each step embeds one batch of them, prefill
only, before the prompts. A request may name a LoRA adapter loaded on the model (`models.multi_lora`): every
forward pass says each row's (`use_adapters`), so requests for different adapters share batches; their KV is
kept out of the prefix cache, which holds the base model's.

Faults stay with their request: a request whose prefill or sampling raises is failed alone (its output
carries the error) while the others go on with exactly the tokens they would have had anyway. With a
`cache_budget`, the KV cache never grows past it: a request that could never fit is refused at `add`, one
that fits later waits, and a cache grown for long requests is given back when the engine goes idle.

`generate`, `chat`, `eval` and `serve` all run on this one engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmasos.errors import ContextLengthError, InvalidRequestError, LLMasOSError
from llmasos.inference.embedding import Embedder
from llmasos.inference.prefix_cache import BLOCK_SIZE, PrefixCache
from llmasos.inference.sampling import SEEDS, SamplingParams, apply_penalties, draw, filter_logits
from llmasos.inference.structured import Grammars, advance
from llmasos.models.multi_lora import Adapter, use_adapters
from llmasos.progress import progress_bar
from llmasos.tokenization import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class Completion:
    """One of a request's n samples."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "tool_calls" (LLM.chat with tools)
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list | None = None  # LLM.chat with tools: the calls this sample made (inference.tools.ToolCall)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    finished: bool = False
    arrival: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # for prompt tokens 2.. (SamplingParams.prompt_logprobs)
    error: str | None = None  # why the engine failed this request (its samples end with "abort")
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead of being computed

    # The first sample, for the common n=1 case (`outs[0].text`).
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def num_generated(self) -> int:
        return sum(len(c.token_ids) for c in self.outputs)


@dataclass
class Delta:
    """What one step added to one sample: for streaming."""

    request: RequestOutput
    index: int
    text: str
    token_ids: list[int]
    finished: bool


class Sequence:
    """One sample being generated: its tokens, text, stop checks and (while running) its cache row."""

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.completion = request.output.outputs[index]
        params = request.params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed((params.seed + index) % SEEDS)
        self.decoder = StreamDecoder(request.tokenizer)
        self.full_text = ""  # decoded so far, stop strings included
        self.emitted = 0  # characters of full_text already handed out
        self.row = -1
        self.matcher = None  # the grammar's state, for a request with structured outputs
        if params.logprobs is not None:
            self.completion.logprobs = []

    @property
    def pos(self) -> int:
        """Position of the next token to feed (the last sampled one)."""
        return len(self.request.prompt_ids) + len(self.completion.token_ids) - 1

    def append(self, token: int, logprob: TokenLogprob | None) -> Delta:
        """Take a sampled token: check stop tokens, stop strings and length; return the text to emit."""
        c, params, req = self.completion, self.request.params, self.request
        c.token_ids.append(token)
        if logprob is not None:
            c.logprobs.append(logprob)
        if token in req.stop_ids:
            c.finish_reason = "stop"
        else:
            self.full_text += self.decoder.push(token)
            if self.matcher is not None and advance(self.matcher, token):
                c.finish_reason = "stop"  # the grammar is complete: nothing may follow
        if c.finish_reason is None and (len(c.token_ids) >= req.max_tokens):
            c.finish_reason = "length"
        if c.finish_reason is not None:
            self.full_text += self.decoder.flush()
        hold = 0
        if params.stop_strings:
            longest = max(map(len, params.stop_strings))
            window = self.full_text[max(0, self.emitted - longest) :]
            hits = [i for i in (window.find(s) for s in params.stop_strings) if i >= 0]
            if hits:
                self.full_text = self.full_text[: max(0, self.emitted - longest) + min(hits)]
                c.finish_reason = "stop"
            else:
                hold = longest - 1  # the tail might be the start of a stop string
        end = len(self.full_text) if c.finish_reason else max(self.emitted, len(self.full_text) - hold)
        text = self.full_text[self.emitted : end]
        self.emitted = end
        c.text = self.full_text[:end]
        return Delta(req.output, self.index, text, [token], c.finish_reason is not None)


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_tokens: int,
        adapter: Adapter | None = None,
    ):
        self.id, self.prompt_ids, self.params, self.tokenizer = request_id, prompt_ids, params, tokenizer
        self.max_tokens = max_tokens
        self.adapter = adapter  # the LoRA adapter its rows run with (None: the base model)
        self.stop_ids = set(params.stop_token_ids or []) | (set() if params.ignore_eos else tokenizer.stop_ids)
        self.output = RequestOutput(request_id, prompt_ids, [Completion(i) for i in range(params.n)], arrival=time.perf_counter())
        self.sequences = [Sequence(self, i) for i in range(params.n)]
        self.prompt_tensor = torch.tensor(prompt_ids)
        self.row = -1  # while its prompt is prefilled: the cache row it goes into
        self.done = 0  # prompt tokens whose keys and values are in that row (cached or computed)

    @property
    def rows(self) -> int:
        """Cache rows it takes once prefilled: one per sample."""
        return self.params.n


# Prompts (or chunks of them) prefilled in one step go through the model together while their padded batch
# holds at most this many tokens (one longer goes alone); prompts only scored take at most this many a step.
PREFILL_TOKENS = 2048
AUTO = "auto"  # max_num_batched_tokens: chunks sized by time (`Pacer`)


class Pacer:
    """Chunk sizes for `max_num_batched_tokens="auto"`: while sequences are running, a step prefills as many prompt
    tokens as take about as long as their decode step, both timed as they run (exponential averages). Their
    inter-token latency then stays within about twice its usual value while a prompt is admitted, and the prompt
    gets about half the machine, on a fast CPU or a slow one alike; with nothing running, prompts go whole.

    The cost per token is averaged over whole prefills, fixed costs included: a chunk too small pays them over
    few tokens, looks dear and is not grown, one too large looks cheap and is cut; the size settles where a
    chunk's fixed cost plus its tokens' takes as long as the decode step (or at `LEAST`, where the fixed cost
    alone takes longer). On a GPU the clock waits for the device, whose work is otherwise still queued."""

    FIRST, LEAST = 16, 8  # prompt tokens a step before any prefill was timed; never fewer, so prompts advance
    SMOOTHING = 0.25  # the weight of the newest time in the averages

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.device, self.clock = device, clock
        self.decode_s: float | None = None  # one decode step of the running sequences
        self.token_s: float | None = None  # one prompt token prefilled

    def tokens(self) -> int:
        """Prompt tokens the next step may prefill beside the running sequences' decode step."""
        if self.decode_s is None or self.token_s is None:
            return self.FIRST
        return max(self.LEAST, int(self.decode_s / max(self.token_s, 1e-9)))  # a clock too coarse to see a prefill

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def saw_decode(self, start: float) -> None:
        self.decode_s = _average(self.decode_s, self.now() - start, self.SMOOTHING)

    def saw_prefill(self, start: float, tokens: int) -> None:
        if tokens:
            self.token_s = _average(self.token_s, (self.now() - start) / tokens, self.SMOOTHING)


def _average(mean: float | None, value: float, weight: float) -> float:
    return value if mean is None else mean + weight * (value - mean)


# The cache's length grows in steps of this many slots; a cache longer than this is given back when idle.
CACHE_STEP = 256


class Engine:
    """Continuous batching for one model: `add` requests, call `step` until `has_work` is false.

    cache_budget: bytes the KV cache may take (None: no limit). It also caps `max_seq_len`, so that one
    sequence always fits; a `max_seq_len` asked for that cannot fit is an error. The prefix cache lives in
    it too, in what the running rows leave (without a budget: at most what a full batch of rows would take).
    enable_prefix_caching: keep prompts' and answers' KV for later requests that share their prefix.
    max_num_batched_tokens: the tokens one step computes (each running sequence's next token, then chunks of
    prompts); None: every admitted prompt whole; "auto": chunks that take about as long as a decode step
    (`Pacer`). A number is at least `max_batch_size`, so that prefill always advances."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        cache_budget: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int | str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        context = config.max_position_embeddings
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_batch_size = max_batch_size
        self.cache = None
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.partial: Request | None = None  # a prompt partly prefilled, in the row after the running ones
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.device = model.model.embed_tokens.weight.device
        self.embedder = Embedder(self, PREFILL_TOKENS)  # texts to embed: one batch a step, before the prefills
        self.grammars = Grammars(tokenizer, config.vocab_size, overlap=self.device.type != "cpu")
        self.num_constrained = 0  # requests with a grammar, queued or running: while 0, steps skip the grammars
        # Bytes one cache slot (one position of one row, keys and values of every layer) takes.
        self.slot_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * self.cache_dtype.itemsize
        self.cache_budget = cache_budget
        if cache_budget is not None:
            fits = self.fit_len(1)
            if fits < 1:
                raise LLMasOSError(
                    f"a KV cache budget of {_size(cache_budget)} cannot hold one sequence of "
                    f"{min(CACHE_STEP, self.max_seq_len)} tokens ({_size(self._bytes(1, 1))})"
                )
            if max_seq_len is not None and max_seq_len > fits:
                raise LLMasOSError(
                    f"a max length of {max_seq_len} tokens does not fit the KV cache budget of "
                    f"{_size(cache_budget)}: at most {fits} tokens do"
                )
            self.max_seq_len = min(self.max_seq_len, fits)
        if max_num_batched_tokens not in (None, AUTO) and (
            isinstance(max_num_batched_tokens, bool)
            or not isinstance(max_num_batched_tokens, int)
            or max_num_batched_tokens < max_batch_size
        ):
            raise LLMasOSError(
                f"max_num_batched_tokens={max_num_batched_tokens!r} must be {AUTO!r} or an integer of at least the max "
                f"batch size ({max_batch_size}): every running sequence's next token counts against it each step"
            )
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pacer = Pacer(self.device) if max_num_batched_tokens == AUTO else None
        self.prefix_cache = PrefixCache(BLOCK_SIZE * self.slot_bytes) if enable_prefix_caching else None

    # ---- requests -------------------------------------------------------------------------------

    def add(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, adapter: Adapter | None = None
    ) -> RequestOutput:
        """Queue a request (a string, or token ids); refused before any work if it cannot fit the context
        or the cache budget. max_tokens=0 (with prompt_logprobs) only scores the prompt. adapter: a LoRA adapter
        loaded on the model (`AdapterSet`) to run it with. A grammar (`params.structured`) is compiled here, in
        the caller's thread, before the request is queued."""
        checked = self.check(prompt, params)
        if params.structured is not None:
            self.grammars.compile(params.structured)
        return self.enqueue(*checked, params, request_id, adapter)

    def enqueue(
        self,
        ids: list[int],
        max_tokens: int,
        params: SamplingParams,
        request_id: str | None = None,
        adapter: Adapter | None = None,
    ) -> RequestOutput:
        """Queue what `check` returned for this prompt and these params (`add` is both). A grammar should be
        compiled already (`grammars.compile`): here, on the engine's thread, it is only copied."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise LLMasOSError(f"request id {request_id!r} is already in use")
        if adapter is not None and adapter.retired:
            raise InvalidRequestError(f"the adapter {adapter.name!r} has been unloaded", param="model")
        req = Request(request_id, ids, params, self.tokenizer, max_tokens, adapter)
        if params.structured is not None:
            for seq, matcher in zip(req.sequences, self.grammars.matchers(params.structured, params.n)):
                seq.matcher = matcher
            self.num_constrained += 1
        self.requests[request_id] = req
        self.waiting.append(req)
        return req.output

    def check(self, prompt: str | list[int], params: SamplingParams) -> tuple[list[int], int]:
        """The prompt's ids and the tokens to generate, or the error `add` would raise."""
        if params.n > self.max_batch_size:
            raise InvalidRequestError(f"n={params.n} is more than the engine's max batch size {self.max_batch_size}", param="n")
        ids = self._prompt_ids(prompt)
        room = self.max_seq_len - len(ids)
        if params.max_tokens == 0:
            if room < 0:
                raise ContextLengthError(
                    f"the prompt has {len(ids)} tokens; the context holds {self.max_seq_len}", param="prompt"
                )
            return ids, 0
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_seq_len}, leaving no room to generate",
                param="prompt",
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ContextLengthError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the context of {self.max_seq_len} tokens; lower max_tokens to at most {room}",
                param="max_tokens",
            )
        if not self._fits(params.n, len(ids) + max_tokens):
            fits = self.fit_len(params.n)
            what = f"n={params.n} sequences" if params.n > 1 else "one sequence"
            raise ContextLengthError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) for {what} needs "
                f"{_size(self._bytes(params.n, len(ids) + max_tokens))} of KV cache; the budget of "
                f"{_size(self.cache_budget)} holds at most {fits} tokens per sequence for {what}"
                + (f": lower max_tokens to at most {fits - len(ids)}" if fits > len(ids) else ""),
                param="max_tokens" if fits > len(ids) else "prompt",
            )
        return ids, max_tokens

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty (no tokens)", param="prompt")
        vocab = self.model.config.vocab_size
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        return ids

    def prompt_logprobs(self, prompt: str | list[int], top: int = 0) -> list[TokenLogprob]:
        """How likely each prompt token is after the ones before it: an entry per token from the second on,
        with its `top` likeliest alternatives. For scoring (lm-eval's log-likelihood); other requests advance too."""
        out = self.run([self.add(prompt, SamplingParams(max_tokens=0, prompt_logprobs=top))])[0]
        if out.error is not None:
            raise LLMasOSError(f"scoring failed: {out.error}")
        return out.prompt_logprobs

    @torch.inference_mode()  # the cache holds inference tensors; moving rows must happen in the same mode
    def abort(self, request_id: str) -> None:
        """Cancel a request, waiting or running; its rows are free for the next step."""
        req = self.requests.get(request_id)
        if req is not None:
            self._end(req)
            self._give_back_cache()
        self.embedder.abort(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.partial or self.embedder.has_work())

    @property
    def num_running(self) -> int:
        """Sequences admitted: decoding, or (a partly prefilled prompt's) about to."""
        return len(self.running) + (self.partial.rows if self.partial else 0)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's name): for a model whose weights were changed in place."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the loop -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Prefill what fits the step (the partly prefilled prompt first, then waiting ones while rows and the
        budget allow; prompts only scored are scored), then one decode step for every running sequence."""
        self.embedder.step()  # one batch of texts to embed, if any wait
        deltas: list[Delta] = []
        left = self._prompt_tokens()
        chunks: list[tuple[Request, int]] = []  # (request, prompt tokens to compute now), in rows len(running)..
        rows, length, scored = len(self.running), self._running_len(), 0
        if self.partial is not None:
            req, self.partial = self.partial, None
            take = len(req.prompt_ids) - req.done if left is None else min(len(req.prompt_ids) - req.done, left)
            chunks.append((req, take))
            rows += req.rows
            left = None if left is None else left - take
        while self.waiting and (left is None or left > 0):
            req = self.waiting[0]
            if req.max_tokens == 0:  # scored only: one forward without the cache, no row taken
                size = len(req.prompt_ids)
                if (scored or chunks) and (scored + size > PREFILL_TOKENS or (left is not None and size > left)):
                    break
                scored += len(self.waiting.popleft().prompt_ids)
                left = None if left is None else max(0, left - size)
                deltas += self._score(req)
                continue
            need = max(length, len(req.prompt_ids) + req.max_tokens)
            if rows + req.rows > self.max_batch_size or not self._fits(rows + req.rows, need):
                break
            self.waiting.popleft()
            req.row = len(self.running) + len(chunks)
            try:
                self._ensure_cache(rows + req.rows, need)
                self._reuse_prefix(req)
            except Exception as e:
                deltas += self._fail(req, e)
                continue
            rows, length = rows + req.rows, need
            take = len(req.prompt_ids) - req.done if left is None else min(len(req.prompt_ids) - req.done, left)
            chunks.append((req, take))
            left = None if left is None else left - take
        pacer = self.pacer
        if chunks:
            start = pacer.now() if pacer else 0.0
            deltas += self._prefill(chunks)
            if pacer:
                pacer.saw_prefill(start, sum(take for _, take in chunks))
        if self.running:
            start = pacer.now() if pacer else 0.0
            deltas += self._decode()
            if pacer:
                pacer.saw_decode(start)
        self._give_back_cache()
        return deltas

    def _prompt_tokens(self) -> int | None:
        """Prompt tokens this step may compute beside the running sequences' next ones (None: no limit)."""
        if self.pacer is not None:
            return self.pacer.tokens() if self.running else None
        if self.max_num_batched_tokens is None:
            return None
        return self.max_num_batched_tokens - len(self.running)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype, as decided when the model was loaded (`Transformer.cache_dtype`, set by
        `set_inference_dtypes`; a model that went without: its weights' dtype)."""
        return self.model.cache_dtype or self.model.model.embed_tokens.weight.dtype

    # ---- the KV cache and its budget ----------------------------------------------------------

    def _slots(self, length: int) -> int:
        """The cache length allocated for sequences of up to `length` tokens."""
        return min(self.max_seq_len, -(-length // CACHE_STEP) * CACHE_STEP)

    def _bytes(self, rows: int, length: int) -> int:
        return rows * self._slots(length) * self.slot_bytes

    def _fits(self, rows: int, length: int, reserved: int = 0) -> bool:
        return self.cache_budget is None or self._bytes(rows, length) + reserved <= self.cache_budget

    def fit_len(self, rows: int) -> int:
        """The longest sequences (prompt + max_tokens) of which `rows` fit the cache budget."""
        if self.cache_budget is None:
            return self.max_seq_len
        slots = self.cache_budget // (rows * self.slot_bytes)
        return self.max_seq_len if slots >= self.max_seq_len else slots // CACHE_STEP * CACHE_STEP

    def _running_len(self) -> int:
        reqs = [s.request for s in self.running] + ([self.partial] if self.partial else [])
        return max((len(r.prompt_ids) + r.max_tokens for r in reqs), default=0)

    @property
    def kv_bytes(self) -> int:
        """Bytes the KV cache's rows and the prefix cache's blocks take now."""
        rows = 0 if self.cache is None else self.cache.rows * self.cache.max_len * self.slot_bytes
        return rows + (self.prefix_cache.bytes if self.prefix_cache else 0)

    def _prefix_room(self) -> int:
        """Bytes the prefix cache may hold now: what the budget leaves beside the rows (without a budget: what a
        full batch of rows may take)."""
        if self.cache_budget is None:
            return self._bytes(self.max_batch_size, self.max_seq_len)
        return self.cache_budget - (0 if self.cache is None else self.cache.rows * self.cache.max_len * self.slot_bytes)

    def _ensure_cache(self, rows: int, length: int) -> None:
        """A cache of at least `rows` rows and `length` slots, grown (old contents copied) when it is not.

        Its length follows what admitted requests can reach (prompt + max_tokens, in steps of CACHE_STEP, at
        most the context), not the context itself: zeroing a full-context cache for 16 rows took seconds here.
        A regrowth takes room for a full batch and twice the length, as far as the budget allows beside the prefix
        cache; room for what it needs itself is made by evicting cached prefixes."""
        old = self.cache
        if old is not None and old.rows >= rows and old.max_len >= length:
            return
        cached = self.prefix_cache.bytes if self.prefix_cache else 0
        if old is not None:
            full = max(rows, self.max_batch_size)
            longer = max(length, 2 * old.max_len) if length > old.max_len else old.max_len
            rows, length = next(
                ((r, n) for r, n in ((full, longer), (full, length)) if self._fits(r, n, reserved=cached)), (rows, length)
            )
        if self.prefix_cache is not None and self.cache_budget is not None:
            self.prefix_cache.shrink_to(self.cache_budget - self._bytes(rows, length))
        self.cache = self.model.new_cache(rows, self._slots(length), self.cache_dtype)
        if old is not None:
            r, n = min(rows, old.rows), min(self.cache.max_len, old.max_len)
            for new, prev in zip(self.cache.k + self.cache.v, old.k + old.v):
                new[:r, :, :n] = prev[:r, :, :n]

    def _give_back_cache(self) -> None:
        """Idle: free a cache grown past the first step of length (long requests), keep a small one warm."""
        if not self.has_work() and self.cache is not None and self.cache.max_len > CACHE_STEP:
            self.cache = None

    # ---- prefill, decode, sampling --------------------------------------------------------------

    def _reuse_prefix(self, req: Request) -> None:
        """Copy the longest cached prefix of the prompt into its row; at least its last token is left to compute
        (its logits pick the first token). A request that wants prompt logprobs computes every position."""
        if self.prefix_cache is None or req.params.prompt_logprobs is not None or req.adapter is not None:
            return  # (an adapter's KV differs from the base's: the cache holds the base model's alone)
        chain = self.prefix_cache.match(req.prompt_ids, len(req.prompt_ids) - 1)
        req.done = req.output.num_cached_tokens = self.prefix_cache.load(chain, self.cache.k, self.cache.v, req.row)

    def _keep_prefix(self, tokens: list[int], length: int, row: int) -> None:
        """Keep the KV of tokens[:length], in `row`, in the prefix cache (as far as there is room)."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(tokens, length, self.cache.k, self.cache.v, row, self._prefix_room())

    def _prefill(self, chunks: list[tuple[Request, int]]) -> list[Delta]:
        """Compute the next `take` prompt tokens of each request into its row (rows len(running).. in order), in
        forwards of right-padded batches (a padded tail writes slots that are overwritten before they are
        attended to). The requests whose prompts are then complete sample their first tokens and join the running
        rows, further samples (n > 1) getting copies of their prompt's row; one left partial moves to the row
        after them. If a forward fails, each of its requests is tried alone, and one that still fails is failed
        by itself."""
        row0, deltas = len(self.running), []
        last: dict[Request, Tensor] = {}  # the logits of the last prompt position, of the prompts now complete
        failed: set[Request] = set()
        for group in self._batches(chunks):
            try:
                last.update(self._forward(group))
            except Exception:
                for one in group:
                    try:
                        if len(group) == 1:
                            raise
                        last.update(self._forward([one]))
                    except Exception as error:
                        failed.add(one[0])
                        deltas += self._fail(one[0], error)
        live = [r for r, _ in chunks if r not in failed]
        done = [r for r in live if r in last]
        partial = [r for r in live if r not in last]
        for r in done:  # while each is still in its own row
            if r.adapter is None:
                self._keep_prefix(r.prompt_ids, len(r.prompt_ids), r.row)
        for i, r in enumerate(done):  # rows left by failed requests are filled from below
            if r.row != row0 + i:
                self.cache.copy_row(r.row, row0 + i, len(r.prompt_ids))
                r.row = row0 + i
        if partial:
            (r,) = partial  # only the last chunk of a step is ever cut
            to = row0 + sum(d.rows for d in done)
            if r.row != to:
                self.cache.copy_row(r.row, to, r.done)
                r.row = to
            self.partial = r
        if not done:
            return deltas
        seqs, source = [r.sequences[0] for r in done], list(range(len(done)))
        for i, r in enumerate(done):
            for seq in r.sequences[1:]:
                self.cache.copy_row(r.row, row0 + len(seqs), len(r.prompt_ids))
                seqs.append(seq)
                source.append(i)
        for seq in seqs:
            seq.row = len(self.running)
            self.running.append(seq)
        now = time.perf_counter()
        for r in done:
            r.output.first_token_at = now
        logits = torch.stack([last[r] for r in done])
        return deltas + self._sample(logits[torch.tensor(source, device=logits.device)], seqs)

    def _batches(self, chunks: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """Consecutive chunks that go through the model together: while the padded batch holds at most
        PREFILL_TOKENS tokens and every row's padded tail stays inside the cache; a request that wants prompt
        logprobs (the logits of every position) goes alone."""
        batches: list[list[tuple[Request, int]]] = []
        for req, take in chunks:
            group = batches[-1] if batches else None
            alone = req.params.prompt_logprobs is not None
            if group and not alone and group[0][0].params.prompt_logprobs is None:
                longest = max(take, *(t for _, t in group))
                reach = max(req.done, *(r.done for r, _ in group)) + longest
                if (len(group) + 1) * longest <= PREFILL_TOKENS and reach <= self.cache.max_len:
                    group.append((req, take))
                    continue
            batches.append([(req, take)])
        return batches

    def _forward(self, group: list[tuple[Request, int]]) -> dict[Request, Tensor]:
        """One forward over the chunks `group`, in consecutive rows; advances each request's `done` and returns
        the last position's logits of those whose prompts it completes."""
        takes = [t for _, t in group]
        ids = torch.zeros(len(group), max(takes), dtype=torch.long)
        for i, (r, t) in enumerate(group):
            ids[i, :t] = r.prompt_tensor[r.done : r.done + t]
        starts = torch.tensor([r.done for r, _ in group])
        # From position 0 the plain causal prefill; after a cached prefix or an earlier chunk, positions and a mask.
        pos = None if not starts.any() else (starts[:, None] + torch.arange(ids.shape[1])).to(self.device)
        first = group[0][0]
        full = first.params.prompt_logprobs is not None  # then it is alone in its batch
        at = None if full else torch.tensor(takes, device=self.device) - 1
        with use_adapters(self.model, [r.adapter for r, _ in group]):
            logits = self.model(ids.to(self.device), pos, self.cache, logits_at=at, cache_row=first.row).float()
        if full:
            self._record_prompt_logprobs(first, logits[0], first.done)
            logits = logits[:, -1:]
        complete = {}
        for i, (r, t) in enumerate(group):
            r.done += t
            if r.done == len(r.prompt_ids):
                complete[r] = logits[i, -1]
        return complete

    def _score(self, req: Request) -> list[Delta]:
        """A request that only scores its prompt: one forward without the cache, then it is finished."""
        try:
            with use_adapters(self.model, [req.adapter]):
                logits = self.model(req.prompt_tensor[None].to(self.device))
            self._record_prompt_logprobs(req, logits[0].float())
        except Exception as e:
            return self._fail(req, e)
        req.output.first_token_at = time.perf_counter()
        for c in req.output.outputs:
            c.finish_reason = "length"
        self._finish_request(req)
        return [Delta(req.output, i, "", [], True) for i in range(req.params.n)]

    def _record_prompt_logprobs(self, req: Request, logits: Tensor, start: int = 0) -> None:
        """logits [S, vocab] of prompt positions start.. -> each next prompt token's logprob and top alternatives
        (added to those of the positions before `start`: a prompt prefilled in chunks is recorded chunk by chunk)."""
        logprobs = logits[: len(req.prompt_ids) - 1 - start].log_softmax(-1)
        nexts = req.prompt_ids[start + 1 : start + 1 + logprobs.shape[0]]
        chosen = logprobs.gather(1, torch.tensor(nexts, dtype=torch.long, device=logprobs.device)[:, None])[:, 0].tolist()
        top = req.params.prompt_logprobs
        alts = logprobs.topk(top, dim=-1) if top else None
        top_ids, top_lps = (alts.indices.tolist(), alts.values.tolist()) if alts else ([[]] * len(chosen),) * 2
        entries = [TokenLogprob(t, lp, list(zip(i, v))) for t, lp, i, v in zip(nexts, chosen, top_ids, top_lps)]
        req.output.prompt_logprobs = (req.output.prompt_logprobs or [])[:start] + entries

    def _decode(self) -> list[Delta]:
        seqs = self.running
        tokens = torch.tensor([[s.completion.token_ids[-1]] for s in seqs], device=self.device)
        positions = [s.pos for s in seqs]
        same = all(p == positions[0] for p in positions)
        pos = torch.tensor([positions[0]] if same else [[p] for p in positions], device=self.device)
        if self.num_constrained:
            self.grammars.prepare([s.matcher for s in seqs])  # the grammars' masks, computed during the forward pass
        with use_adapters(self.model, [s.request.adapter for s in seqs]):
            logits = self.model(tokens, pos, self.cache)
        return self._sample(logits[:, -1].float(), list(seqs))

    def _sample(self, logits: Tensor, seqs: list[Sequence]) -> list[Delta]:
        """Pick and take one token for each of `seqs`, all rows at once. If that raises, each row is done
        alone (same arithmetic, same tokens: `draw` checks every row before any generator is used) and a row
        that still raises fails its request alone."""
        try:
            picked = [(seq, token, logprob) for seq, (token, logprob) in zip(seqs, self._pick(logits, seqs))]
        except Exception:
            picked = []
            for i, seq in enumerate(seqs):
                try:
                    token, logprob = self._pick(logits[i : i + 1], [seq])[0]
                    picked.append((seq, token, logprob))
                except Exception as e:
                    picked.append((seq, e, None))
        deltas, failed = [], {}
        for seq, token, logprob in picked:
            if isinstance(token, Exception):
                failed.setdefault(seq.request, token)
                continue
            try:
                deltas.append(seq.append(token, logprob))
            except Exception as e:
                failed.setdefault(seq.request, e)
        done = [s for s in seqs if s.completion.finish_reason is not None and s.request not in failed]
        if done:
            self._release(done)
            for req in {s.request for s in done}:
                if all(c.finish_reason for c in req.output.outputs):
                    self._finish_request(req)
        for req, error in failed.items():
            deltas += self._fail(req, error)
        return deltas

    def _pick(self, logits: Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        """The sampler: penalties, grammar masks, greedy or filtered draws, logprobs; one (token, logprob) per row."""
        params = [s.request.params for s in seqs]
        if any(p.penalized for p in params):
            logits = logits.clone()
            for i, (s, p) in enumerate(zip(seqs, params)):
                if p.penalized:
                    out = torch.tensor(s.completion.token_ids, dtype=torch.long, device=logits.device)
                    apply_penalties(logits[i], p, s.request.prompt_tensor.to(logits.device), out)
        # What each grammar allows (logprobs: all); nothing to do while no request has one.
        scores = self.grammars.mask(logits, [s.matcher for s in seqs]) if self.num_constrained else logits
        chosen = torch.empty(len(seqs), dtype=torch.long)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy) == len(seqs):
            chosen = scores.argmax(-1).cpu()
        elif greedy:
            chosen[greedy] = scores[greedy].argmax(-1).cpu()
        if sampled:
            sub = [params[i] for i in sampled]
            filtered = filter_logits(
                scores[sampled],
                torch.tensor([p.temperature for p in sub], device=logits.device),
                torch.tensor([p.top_k for p in sub], device=logits.device),
                torch.tensor([p.top_p for p in sub], device=logits.device),
                torch.tensor([p.min_p for p in sub], device=logits.device),
            )
            chosen[sampled] = draw(filtered.cpu(), [seqs[i].generator for i in sampled])
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            lp = logits[want].log_softmax(-1).cpu()
            for j, i in enumerate(want):
                k = params[i].logprobs
                top = lp[j].topk(k) if k else None
                alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                logprobs[i] = TokenLogprob(int(chosen[i]), float(lp[j, chosen[i]]), alts)
        return list(zip(chosen.tolist(), logprobs))

    def _fail(self, req: Request, error: Exception) -> list[Delta]:
        """End `req` alone with `error` (its rows freed); a finished delta per sample tells its listener."""
        log.error("request %s failed: %s: %s", req.id, type(error).__name__, error, exc_info=error)
        req.output.error = f"{type(error).__name__}: {error}"
        self._end(req, keep=False)
        return [Delta(req.output, i, "", [], True) for i in range(req.params.n)]

    def _end(self, req: Request, keep: bool = True) -> None:
        """Take `req` out of the queue, the partial prefill or the running set now; samples not finished end with
        "abort". keep: its rows' KV may go to the prefix cache (not that of a request that failed)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req is self.partial:
            self.partial = None  # the last row in use: nothing moves
        for seq in req.sequences:
            if seq.completion.finish_reason is None:
                seq.completion.finish_reason = "abort"
        self._release([s for s in self.running if s.request is req], keep)
        self._finish_request(req)

    def _release(self, seqs: list[Sequence], keep: bool = True) -> None:
        """Take sequences out of the running set (their KV kept in the prefix cache), moving the last rows into
        the holes they leave, and the partly prefilled prompt's row down after them."""
        for seq in sorted((s for s in seqs if s.row >= 0), key=lambda s: -s.row):
            if keep and seq.request.adapter is None:  # the prefix cache holds the base model's KV alone
                self._keep_prefix(seq.request.prompt_ids + seq.completion.token_ids, seq.pos, seq.row)
            last = self.running[-1]
            if last is not seq:
                self.cache.copy_row(last.row, seq.row, last.pos + 1)
                self.running[seq.row] = last
                last.row = seq.row
            self.running.pop()
            seq.row = -1
        partial = self.partial
        if partial is not None and partial.row != len(self.running):
            self.cache.copy_row(partial.row, len(self.running), partial.done)
            partial.row = len(self.running)

    def _finish_request(self, req: Request) -> None:
        req.output.finished = True
        req.output.finished_at = time.perf_counter()
        if self.requests.get(req.id) is req:
            del self.requests[req.id]
            if req.params.structured is not None:
                self.num_constrained -= 1

    def run(self, outputs: list[RequestOutput], progress: bool = False) -> list[RequestOutput]:
        """Step until every one of `outputs` is finished (other requests advance too)."""
        bar = None
        if progress:
            bar = progress_bar(total=len(outputs), desc="generating", unit="req", leave=False)
        while not all(o.finished for o in outputs):
            self.step()
            if bar is not None:
                bar.n = sum(o.finished for o in outputs)
                bar.refresh()
        if bar is not None:
            bar.close()
        return outputs


def _size(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
