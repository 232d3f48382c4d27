"""The one thread that owns the engine.

The engine is synchronous and not thread-safe, so every call into it (adding, aborting, stepping,
scoring) runs on this thread. Async handlers hand it work through a thread-safe queue of commands and
get each request's deltas back on their own asyncio queue (`loop.call_soon_threadsafe`). When there is
nothing to step, the thread sleeps on the command queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from llmasos.errors import InvalidRequestError
from llmasos.inference.embedding import EmbeddingRequest
from llmasos.inference.engine import PREFILL_TOKENS, Delta, Engine, RequestOutput
from llmasos.inference.sampling import SamplingParams
from llmasos.models.multi_lora import Adapter

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PrefixCacheStats:
    """The engine's prefix cache, as /metrics shows it: prompt tokens looked up and found since start, and
    tokens held now."""

    queries: int = 0
    hits: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class PacingStats:
    """Chunked prefill paced by time (`max_num_batched_tokens="auto"`), as /metrics shows it: the prompt tokens a
    step may prefill beside the running sequences, and their decode step's time (smoothed)."""

    chunk_tokens: int
    decode_step_s: float


class QueueFullError(Exception):
    """Every running slot is taken and the waiting queue is full: the client should retry later."""


class EngineFailure(Exception):
    """The engine failed this request (or, raising in a step, every request it was running)."""


class _End:
    """Sent after a request's last delta (or when it was aborted)."""

    def __init__(self, request_id: str):
        self.request_id = request_id


class Stream:
    """The requests of one API call: their outputs, and their deltas in the order the engine made them.

    Iterate it once; `cancel` (always call it, e.g. in a `finally`) aborts whatever has not finished,
    which is how a client that goes away frees its rows."""

    def __init__(self, worker: EngineThread, outputs: list[RequestOutput], inbox: asyncio.Queue):
        self.worker, self.outputs, self._inbox = worker, outputs, inbox
        self._open = {o.request_id for o in outputs}

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while self._open:
            item = await self._inbox.get()
            if isinstance(item, _End):
                self._open.discard(item.request_id)
            elif isinstance(item, BaseException):
                raise EngineFailure(str(item)) from item
            else:
                for delta in item:
                    yield delta

    def cancel(self) -> None:
        for request_id in self._open:
            self.worker.abort(request_id)
        self._open.clear()


class EngineThread:
    """Runs `engine` on a background thread. `max_queue`: sequences that may wait for a free row.

    on_idle: called on the engine thread each time its last open request ends (the model pool's cue that
    the model is idle)."""

    def __init__(
        self, engine: Engine, max_queue: int = 256, name: str = "llmasos-engine", on_idle: Callable[[], None] | None = None
    ):
        self.engine, self.max_queue, self.on_idle = engine, max_queue, on_idle
        self._commands: queue.SimpleQueue[tuple[Callable[[Engine], Any], Future | None]] = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[Any], None]] = {}  # request id -> thread-safe put into its Stream
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.num_running = 0  # snapshots for /metrics, refreshed by the thread after every step
        self.num_waiting = 0
        self.prefix_cache = PrefixCacheStats()
        self.pacing: PacingStats | None = None  # with max_num_batched_tokens="auto", once a decode step was timed

    # ---- from the event loop -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left (its clients get finish_reason "abort") and end the thread."""
        if self._thread.is_alive():
            self._commands.put((self._shutdown, None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_open(self) -> int:
        """Requests queued, running or not yet ended (a stream's last deltas may still be on their way)."""
        return len(self._sinks)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread, between two steps, and return its result."""
        future: Future = Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        self._commands.put((lambda engine: self._abort(engine, request_id), None))

    async def submit(self, prompts: list[list[int]], params: SamplingParams, adapter: Adapter | None = None) -> Stream:
        """Queue one request per prompt (all or none), run with the LoRA `adapter` if one is given. Raises, before
        any work is done, the engine's errors (context length, bad ids), `InvalidRequestError` for more sequences
        than the server ever holds at once, and `QueueFullError` when there is no room now."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        ids = [f"req-{uuid.uuid4().hex}" for _ in prompts]

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        def add(engine: Engine) -> list[RequestOutput]:
            wanted, capacity = params.n * len(prompts), engine.max_batch_size + self.max_queue
            if wanted > capacity:
                raise InvalidRequestError(
                    f"this request asks for {wanted} sequences (n={params.n} for each of {len(prompts)} prompts); "
                    f"the server holds at most {capacity} at once ({engine.max_batch_size} running, {self.max_queue} "
                    "waiting)",
                    param="n" if params.n > 1 else "prompt",
                )
            checked = [engine.check(prompt, params) for prompt in prompts]
            busy = engine.num_running + sum(r.params.n for r in engine.waiting)
            if busy + wanted > capacity:
                raise QueueFullError(
                    f"the server is busy: {engine.num_running} sequences running and "
                    f"{engine.num_waiting} requests waiting (the queue holds {self.max_queue})"
                )
            outputs: list[RequestOutput] = []
            try:
                for request_id, (prompt_ids, max_tokens) in zip(ids, checked):
                    outputs.append(engine.enqueue(prompt_ids, max_tokens, params, request_id, adapter))
                    self._sinks[request_id] = put
            except BaseException:
                for out in outputs:
                    self._abort(engine, out.request_id)
                raise
            return outputs

        try:
            outputs = await self.call(add)
        except asyncio.CancelledError:  # the client left while the command was queued
            for request_id in ids:
                self.abort(request_id)
            raise
        return Stream(self, outputs, inbox)

    async def embed(
        self, inputs: list[list[int]], pooling: str, adapter: Adapter | None = None
    ) -> tuple[EmbeddingRequest, asyncio.Future]:
        """Queue token id lists to embed (all or none); returns the request and a future done when it is finished
        (its `error` set if it failed or was aborted). Raises the engine's errors before any work, and
        `QueueFullError` when more than `max_queue` batches of embedding work already wait."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        request_id = f"embd-{uuid.uuid4().hex}"

        def finished(req: EmbeddingRequest) -> None:  # on the engine thread
            self._sinks.pop(request_id, None)
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(req))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        def add(engine: Engine) -> EmbeddingRequest:
            queued, tokens = engine.embedder.waiting_tokens, sum(map(len, inputs))
            if queued and queued + tokens > max(1, self.max_queue) * PREFILL_TOKENS:
                raise QueueFullError(f"the server is busy: {queued} tokens wait to be embedded")
            req = engine.embedder.add(inputs, pooling, adapter, request_id, finished)
            self._sinks[request_id] = lambda item: None  # so that shutting down or a failed step aborts it too
            return req

        try:
            req = await self.call(add)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return req, done

    # ---- on the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._run_commands(wait=not self.engine.has_work())
            if self._stopping or not self.engine.has_work():
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
            else:
                self._dispatch(deltas)
            self._snapshot()

    def _run_commands(self, wait: bool) -> None:
        try:
            command = self._commands.get() if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = command
            if future is None:
                fn(self.engine)
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:
                    future.set_exception(e)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._snapshot()

    def _snapshot(self) -> None:
        engine = self.engine
        self.num_running, self.num_waiting = engine.num_running, engine.num_waiting
        cache = engine.prefix_cache
        if cache is not None:
            self.prefix_cache = PrefixCacheStats(cache.queries, cache.hits, cache.num_tokens)
        pacer = engine.pacer
        if pacer is not None and pacer.decode_s is not None:
            self.pacing = PacingStats(pacer.tokens(), pacer.decode_s)

    def _dispatch(self, deltas: list[Delta]) -> None:
        by_request: dict[str, list[Delta]] = defaultdict(list)
        for delta in deltas:
            by_request[delta.request.request_id].append(delta)
        for request_id, batch in by_request.items():
            put = self._sinks.get(request_id)
            if put is None:
                continue
            request = batch[0].request
            put(EngineFailure(request.error) if request.error is not None else batch)
            if request.finished:
                put(_End(request_id))
                del self._sinks[request_id]
                self._idle_check()

    def _abort(self, engine: Engine, request_id: str) -> None:
        engine.abort(request_id)
        put = self._sinks.pop(request_id, None)
        if put is not None:
            put(_End(request_id))
            self._idle_check()

    def _idle_check(self) -> None:
        if not self._sinks and self.on_idle is not None:
            try:
                self.on_idle()
            except Exception:  # the callback's failure must not stop the engine
                log.exception("on_idle failed")

    def _fail_all(self, error: Exception) -> None:
        for request_id, put in list(self._sinks.items()):
            put(error)
            try:
                self._abort(self.engine, request_id)
            except Exception:  # the failed step may have left the request half-updated
                log.exception("could not abort %s after the failed step", request_id)
                self._sinks.pop(request_id, None)
                self._idle_check()

    def _shutdown(self, engine: Engine) -> None:
        for request_id in list(self._sinks):
            self._abort(engine, request_id)
        self._stopping = True
