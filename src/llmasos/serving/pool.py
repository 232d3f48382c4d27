"""The models one server may serve, and those it has loaded now: the model pool.

A request names a model; `lease` hands its handler the loaded model, loading it first when it is not
loaded (every request that asks for it meanwhile waits for that one load). A loaded model stays for its
keep-alive after its last request ends, then unloads; a model that does not fit the memory budget first
unloads the least recently used idle ones, and one that could never fit is refused, saying how much it needs
and how much there is. A model's memory is its weights plus the KV cache its engine may grow to, reserved
in full when it loads, so the budget holds whatever its requests do.

Faults stay with their model: a load that fails (a truncated shard, a bad config) fails the requests that
waited for it, with the loader's message (which names the file), and leaves the pool as it was; a load whose
every client left is cancelled and leaves nothing behind.

Everything here runs on the event loop, except loads (a worker thread each) and the engines (a thread
each, `engine_thread`). The clock is injectable, so tests move time instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from llmasos.checkpoints.load import open_checkpoint
from llmasos.checkpoints.paths import stored_models
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.inference import LLM
from llmasos.inference import adapters as lora
from llmasos.inference.llm import resolve_dtype
from llmasos.kernels import inference_dtype, load_ops
from llmasos.serving.engine_thread import EngineThread

log = logging.getLogger(__name__)

FOREVER = math.inf
DEFAULT_KEEP_ALIVE = 300.0
RAM_FRACTION = 0.75  # of the memory available at start-up, the default budget on a CPU
GPU_FRACTION = 0.9  # of the GPU's free memory, on a GPU
KV_SHARE = 4  # without --kv-cache-memory, one model's KV cache may take at most a quarter of the budget
DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# ---- errors --------------------------------------------------------------------------------------


class ModelNotFoundError(LLMasOSError):
    """A model this server does not serve (a 404 naming those it does)."""

    def __init__(self, name: str, available: list[str]):
        served = ", ".join(f"`{n}`" for n in available) or "none (the store is empty: `llmasos pull SOURCE` adds one)"
        super().__init__(f"The model `{name}` does not exist; this server serves {served}.")
        self.name, self.available, self.param = name, available, "model"


class InsufficientMemoryError(LLMasOSError):
    """A model that cannot fit the memory budget, even with every other model unloaded."""

    def __init__(self, message: str, need: int, available: int):
        super().__init__(message)
        self.need, self.available, self.param = need, available, "model"


class ModelLoadError(LLMasOSError):
    """A stored model that could not be loaded; the message says why and names the file."""


class ClientGone(Exception):
    """The client left while its request waited for a model."""


class LoadCancelled(Exception):
    """A load whose every client left."""


# ---- durations and sizes ---------------------------------------------------------------------------


def parse_keep_alive(value: str | float | None, param: str = "keep_alive") -> float:
    """Seconds, as Ollama takes `keep_alive`: a number of seconds or a duration ("5m", "1h30m", "300ms");
    0 unloads after the answer, a negative one ("-1", "-1m") keeps the model loaded for good (math.inf)."""
    if isinstance(value, bool) or value is None:
        raise InvalidRequestError(f"{param} must be a duration such as 5m, 30s or -1, or a number of seconds", param=param)
    if isinstance(value, int | float):
        if math.isnan(value):
            raise InvalidRequestError(f"{param} is not a number", param=param)
        return FOREVER if value < 0 else float(value)
    text = value.strip()
    with suppress(ValueError):
        return parse_keep_alive(float(text), param)
    body = text.lstrip("+-")
    parts = DURATION.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise InvalidRequestError(
            f"{param} {value!r} is not a duration: use a number of seconds or units h, m, s, ms (e.g. 5m, 1h30m, -1)",
            param=param,
        )
    return FOREVER if text.startswith("-") else sum(float(number) * UNITS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    if seconds == FOREVER:
        return "forever"
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_memory() -> int:
    """Memory available now: Linux's MemAvailable (page cache counts as free), the free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_memory_budget(device: str = "cpu") -> int:
    """What models may take when --memory-budget is not given: most of the GPU's free memory on a GPU,
    three quarters of the memory available at start-up on a CPU."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * GPU_FRACTION)
    return int(available_memory() * RAM_FRACTION)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the weights (and buffers) hold, each storage counted once (memory-mapped files included)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def reclaim() -> None:
    """Give the memory of what was just dropped back to the system: Python's cycles, glibc's free lists
    (malloc keeps freed blocks for reuse, so RSS would not go down), PyTorch's CUDA cache."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


# ---- what can be served ----------------------------------------------------------------------------


@dataclass
class LoadOptions:
    """How every model of a server is loaded (the `serve` flags)."""

    dtype: str = "auto"
    device: str = "cpu"
    quantize: str | None = None
    compile: bool = False
    max_running: int = 16  # rows each model decodes together
    max_queue: int = 256  # sequences that may wait for a row, per model
    max_model_len: int | None = None  # cap on each model's context
    kv_cache_memory: int | None = None  # each model's KV cache budget (None: see ModelPool)
    prefix_caching: bool = True
    max_num_batched_tokens: int | str | None = None  # chunked prefill's step budget (None: whole prompts; "auto": timed)


class Catalog:
    """The models a server may serve: the whole store (read again at each look, so a model pulled while the
    server runs is served too), the named part of it, or fixed name -> dir pairs."""

    def __init__(self, paths: dict[str, Path | None] | None = None, names: list[str] | None = None):
        self._paths, self._names = paths, names
        self._described: dict[tuple[str, float], dict[str, Any]] = {}

    def models(self) -> dict[str, Path | None]:
        if self._paths is not None:
            return dict(self._paths)
        stored = {p.name: p for p in stored_models()}
        if self._names is None:
            return stored
        return {n: stored[n] for n in self._names if n in stored}

    def names(self) -> list[str]:
        return list(self.models())

    def describe(self, name: str, path: Path | None) -> dict[str, Any]:
        """What a model is, read from its files without loading it (cached while config.json is unchanged):
        config (None if unreadable, with `error`), size on disk, modification time, a digest."""
        if path is None:  # an LLM built in Python, served as it is
            digest = hashlib.sha256(name.encode()).hexdigest()
            return {"config": None, "error": None, "size": 0, "modified": time.time(), "digest": digest}
        config_file = path / "config.json" if path.is_dir() else path
        try:
            mtime = config_file.stat().st_mtime
        except OSError:
            mtime = 0.0
        key = (str(path), mtime)
        if key not in self._described:
            info: dict[str, Any] = {"config": None, "error": None}
            try:
                info["config"], entries = open_checkpoint(path)
            except Exception as e:  # a broken model is still listed; its requests say what is wrong
                info["error"] = str(e)
            files = [p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()]
            info["size"] = sum(p.stat().st_size for p in files)
            info["modified"] = max([mtime, *(p.stat().st_mtime for p in files)])
            digest = hashlib.sha256()
            for p in sorted(files):
                where = p.relative_to(path) if path.is_dir() else p.name
                digest.update(f"{where}:{p.stat().st_size}:{p.stat().st_mtime}\n".encode())
            info["digest"] = digest.hexdigest()
            self._described = {k: v for k, v in self._described.items() if k[0] != str(path)}
            self._described[key] = info
        return self._described[key]


def estimate(path: Path, options: LoadOptions, kv_cap: int | None) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) a model will take, from its files (nothing is loaded). Quantized
    models are counted at full precision: that is what they take while they are quantized."""
    config, entries = open_checkpoint(path)
    dtype = resolve_dtype(options.dtype, config.dtype, options.device)
    weights = sum(
        math.prod(e.shape) * (dtype.itemsize if e.dtype.is_floating_point else e.dtype.itemsize) for e in entries.values()
    )
    kernels = torch.device(options.device).type == "cpu" and load_ops() is not None
    cache = inference_dtype(dtype, options.device, kernels).itemsize
    assert config.head_dim is not None and config.num_key_value_heads is not None
    slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * cache
    context = min(options.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    return weights, kv_reservation(options.max_running * context * slot, kv_cap, options.prefix_caching)


def kv_reservation(rows: int, budget: int | None, prefix_caching: bool) -> int:
    """What an engine's KV cache may grow to: its rows (a full batch at full length), and beside them the
    prefix cache, given as much room as the rows at most, all within `budget`."""
    most = rows * (2 if prefix_caching else 1)
    return most if budget is None else min(most, budget)


def load(path: Path, options: LoadOptions, cache_budget: int | None, cancelled: threading.Event) -> LLM:
    """The default loader (run on a worker thread): the model as `LLM.load` loads it."""
    if cancelled.is_set():
        raise LoadCancelled
    config, _ = open_checkpoint(path)
    max_len = min(options.max_model_len, config.max_position_embeddings) if options.max_model_len else None
    llm = LLM.load(
        path,
        dtype=options.dtype,
        device=options.device,
        quantize=options.quantize,
        compile=options.compile,
        max_batch_size=options.max_running,
        max_seq_len=max_len,
        cache_budget=cache_budget,
        enable_prefix_caching=options.prefix_caching,
        max_num_batched_tokens=options.max_num_batched_tokens,
    )
    if cancelled.is_set():
        raise LoadCancelled
    touch(llm.model)
    return llm


def touch(model: torch.nn.Module) -> None:
    """Read a value of every page of the weights, so that memory-mapped ones are in memory when the load ends,
    not in the first request's forward pass (where a cold model's time to first token paid for them)."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.device.type == "cpu" and t.numel() and t.is_contiguous():
                t.view(-1)[:: max(1, 4096 // t.element_size())].sum()


# ---- the pool -------------------------------------------------------------------------------------


class Loaded:
    """A model in memory: its LLM, the thread running its engine, its handlers (`service`), its memory,
    and when it was last used. `leases`: requests that hold it now."""

    def __init__(self, name: str, path: Path | None, llm: LLM, keep_alive: float, now: float, pinned: bool):
        self.name, self.path, self.llm, self.keep_alive, self.pinned = name, path, llm, keep_alive, pinned
        self.worker: Any = None
        self.service: Any = None
        self.weights_bytes = model_bytes(llm.model)
        engine = llm.engine
        full = engine.max_batch_size * engine.max_seq_len * engine.slot_bytes
        self.kv_bytes = kv_reservation(full, engine.cache_budget, engine.prefix_cache is not None)
        self.leases, self.last_used, self.loaded_at = 0, now, time.time()
        self.load_seconds = 0.0
        self.unloading: asyncio.Future | None = None

    @property
    def size(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def busy(self) -> bool:
        return self.leases > 0 or (self.worker is not None and self.worker.num_open > 0)

    def kv_used(self) -> int:
        """The KV cache's rows and the prefix cache's blocks, now."""
        return 0 if self.llm is None else self.llm.engine.kv_bytes


class _Load:
    def __init__(self, name: str):
        self.name = name
        self.task: asyncio.Task | None = None
        self.waiters = 0
        self.cancelled = threading.Event()
        self.in_thread = False  # the loader runs: only the flag can stop it
        self.granted = False  # the loaded model was handed to the waiters (a lease each)
        self.reserved = 0


class ModelPool:
    """Loads, keeps and unloads the models of `catalog`.

    memory_budget: bytes every loaded model together may take (weights plus KV caches); None: no limit.
    options.kv_cache_memory: each model's KV cache budget; when None and there is a memory budget, a model's
    KV cache is capped at a quarter of it. keep_alive: seconds a model stays after its last request ends by
    default (math.inf: for good). tick: seconds between keep-alive checks. loader(path, options, cache_budget,
    cancelled): builds the LLM on a worker thread (tests pass one that waits). clock: monotonic seconds."""

    def __init__(
        self,
        catalog: Catalog,
        options: LoadOptions | None = None,
        memory_budget: int | None = None,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        tick: float = 1.0,
        loader: Callable[[Path, LoadOptions, int | None, threading.Event], LLM] = load,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.catalog, self.options = catalog, options or LoadOptions()
        self.memory_budget, self.keep_alive, self.tick = memory_budget, keep_alive, tick
        self.loader, self.clock = loader, clock
        self.loaded: dict[str, Loaded] = {}
        self.loading: dict[str, _Load] = {}
        self.make_service: Callable[[str, LLM, EngineThread], Any] = lambda name, llm, worker: None
        self.metrics: Any = None
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmasos-load")

    # ---- set-up ----

    def bind(self, make_service: Callable[[str, LLM, EngineThread], Any], metrics: Any) -> None:
        """What the app adds: the handlers of a loaded model, and the metrics loads are counted in."""
        self.make_service, self.metrics = make_service, metrics

    def preload(self, name: str, llm: LLM) -> Loaded:
        """Serve `llm`, already loaded, as `name` for good (`llmasos serve MODEL`)."""
        entry = self._register(name, llm.path, llm, pinned=True)
        if self._loop is not None:
            entry.worker.start()
        return entry

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        for entry in self.loaded.values():
            if not entry.worker.alive:
                entry.worker.start()
        self._ticker = asyncio.ensure_future(self._tick())

    async def close(self) -> None:
        """Stop every engine (what runs is aborted) and forget every model."""
        if self._ticker is not None:
            self._ticker.cancel()
        for load in list(self.loading.values()):
            self._cancel_load(load)
        for entry in list(self.loaded.values()):
            entry.worker.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def entries(self) -> list[Loaded]:
        """The models loaded now (not those on their way out)."""
        return [e for e in self.loaded.values() if e.unloading is None]

    # ---- names ----

    def names(self) -> list[str]:
        """Every model this server serves: those of the catalog, and any loaded one (a pinned model)."""
        names = self.catalog.names()
        return names + [n for n in self.loaded if n not in names]

    def resolve(self, name: str | None) -> str:
        """The served name `name` means ("x:latest" is "x", as Ollama's clients say it; None is the only
        model of a one-model server)."""
        if name is not None and name in self.loaded:
            return name
        names = self.names()
        if name is None:
            if len(names) == 1:
                return names[0]
            raise InvalidRequestError(
                f"model is required: this server serves {', '.join(f'`{n}`' for n in names) or 'no model yet'}", param="model"
            )
        for candidate in (name, name.removesuffix(":latest")):
            if candidate in names:
                return candidate
        for entry in self.entries():  # a LoRA adapter is served by the model it is loaded on
            if entry.llm is not None and lora.get(entry.llm.model, name) is not None:
                return entry.name
        raise ModelNotFoundError(
            name, [*names, *(a for e in self.entries() if e.llm is not None for a in lora.names(e.llm.model))]
        )

    def path(self, name: str) -> Path | None:
        entry = self.loaded.get(name)
        return entry.path if entry is not None else self.catalog.models().get(name)

    # ---- leases ----

    @asynccontextmanager
    async def lease(
        self,
        name: str | None,
        keep_alive: float | None = None,
        gone: Callable[[], Awaitable[Any]] | None = None,
        reset: bool = True,
    ) -> AsyncIterator[Loaded]:
        """The model `name`, loaded, held for the block (it is not unloaded while held, nor while its engine
        has requests of it). keep_alive: how long it stays after this request (None: the server's default,
        as Ollama does; with reset=False, whatever it had: tokenizing is no reason to change it).
        gone: returns when the client has left; then a wait for the model ends in `ClientGone`."""
        entry = await self.acquire(name, keep_alive, gone, reset)
        try:
            yield entry
        finally:
            self.release(entry)

    async def acquire(
        self,
        name: str | None,
        keep_alive: float | None = None,
        gone: Callable[[], Awaitable[Any]] | None = None,
        reset: bool = True,
    ) -> Loaded:
        name = self.resolve(name)
        keep = self.keep_alive if keep_alive is None else keep_alive
        while True:
            entry = self.loaded.get(name)
            if entry is not None and entry.unloading is None:
                entry.leases += 1
                entry.last_used = self.clock()
                if keep_alive is not None or reset:
                    entry.keep_alive = keep
                return entry
            if entry is not None:  # on its way out: load it again once it is gone
                await self._wait(asyncio.shield(entry.unloading), gone)
                continue
            load = self.loading.get(name)
            if load is not None and load.cancelled.is_set():  # a cancelled load still ending: then start anew
                with suppress(Exception):
                    await self._wait(asyncio.shield(load.task), gone)
                continue
            if load is None:
                load = self._start_load(name)
            load.waiters += 1
            try:
                entry = await self._wait(asyncio.shield(load.task), gone)
            except BaseException:
                load.waiters -= 1
                if load.granted:  # loaded just as this request gave up: hand back its lease
                    self.release(load.task.result())
                elif load.waiters == 0 and not load.task.done():
                    self._cancel_load(load)
                raise
            load.waiters -= 1
            if keep_alive is not None or reset:
                entry.keep_alive = keep
            return entry  # its lease was granted by the load

    def release(self, entry: Loaded) -> None:
        entry.leases -= 1
        entry.last_used = self.clock()
        self._idle(entry)

    async def _wait(self, future: asyncio.Future, gone: Callable[[], Awaitable[Any]] | None) -> Any:
        if gone is None:
            return await future
        watcher = asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            future.cancel()
            raise
        finally:
            watcher.cancel()
        if future in done:
            return future.result()
        future.cancel()
        raise ClientGone

    # ---- loading ----

    def _start_load(self, name: str) -> _Load:
        load = _Load(name)
        self.loading[name] = load
        load.task = asyncio.ensure_future(self._load(name, load))
        load.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even with no waiter
        return load

    def _cancel_load(self, load: _Load) -> None:
        log.info("loading %s cancelled: its clients left", load.name)
        load.cancelled.set()
        if not load.in_thread and load.task is not None:
            load.task.cancel()

    def kv_cap(self) -> int | None:
        if self.options.kv_cache_memory is not None:
            return self.options.kv_cache_memory
        return None if self.memory_budget is None else self.memory_budget // KV_SHARE

    async def _load(self, name: str, load: _Load) -> Loaded:
        path = self.catalog.models().get(name)
        started = time.perf_counter()
        try:
            if path is None:
                raise ModelNotFoundError(name, self.names())
            cap = self.kv_cap()
            weights, kv = await asyncio.to_thread(estimate, path, self.options, cap)
            await self._make_room(name, weights, kv)
            load.reserved, load.in_thread = weights + kv, True
            loop = asyncio.get_running_loop()
            # The engine's KV budget is what was reserved for it: a tiny model does not hold a quarter of the budget.
            llm = await loop.run_in_executor(self._executor, self.loader, path, self.options, kv, load.cancelled)
            if load.cancelled.is_set():
                del llm
                reclaim()
                raise LoadCancelled
            entry = self._register(name, path, llm)
            entry.load_seconds = time.perf_counter() - started
            entry.worker.start()
            entry.leases += load.waiters
            load.granted = True
            log.info("loaded %s in %.2f s (%s)", name, entry.load_seconds, human_bytes(entry.size))
            if self.metrics is not None:
                self.metrics.loads.labels(name).inc()
                self.metrics.load_seconds.labels(name).observe(entry.load_seconds)
            return entry
        except BaseException as e:
            if self.metrics is not None:
                self.metrics.load_failures.labels(name).inc()
            if isinstance(e, LLMasOSError) and not isinstance(e, InsufficientMemoryError | ModelNotFoundError):
                raise ModelLoadError(f"could not load the model `{name}`: {e}") from e
            if isinstance(e, Exception) and not isinstance(e, LLMasOSError | LoadCancelled):
                log.exception("loading %s failed", name)
                raise ModelLoadError(f"could not load the model `{name}` from {path}: {type(e).__name__}: {e}") from e
            raise
        finally:
            if self.loading.get(name) is load:
                del self.loading[name]
            self._notify()

    def _register(self, name: str, path: Path | None, llm: LLM, pinned: bool = False) -> Loaded:
        entry = Loaded(name, path, llm, FOREVER if pinned else self.keep_alive, self.clock(), pinned)

        def idle() -> None:  # on the engine thread
            if self._loop is not None:
                with suppress(RuntimeError):  # the loop is closed: nothing to tell
                    self._loop.call_soon_threadsafe(self._idle, entry)

        entry.worker = EngineThread(llm.engine, self.options.max_queue, name=f"llmasos-engine-{name}", on_idle=idle)
        entry.service = self.make_service(name, llm, entry.worker)
        self.loaded[name] = entry
        return entry

    def used(self) -> int:
        """Bytes the loaded models and the loads under way take."""
        return sum(e.size for e in self.loaded.values()) + sum(load.reserved for load in self.loading.values())

    async def _make_room(self, name: str, weights: int, kv: int) -> None:
        """Return once `weights + kv` fit the budget, unloading the least recently used idle models as needed
        and waiting for busy ones to finish; raise if it could never fit."""
        need, budget = weights + kv, self.memory_budget
        if budget is None:
            return
        while True:
            kept = sum(e.size for e in self.loaded.values() if e.pinned)
            if need + kept > budget:
                what = f"{human_bytes(need)} ({human_bytes(weights)} of weights + {human_bytes(kv)} of KV cache)"
                held = f", of which {human_bytes(kept)} is held by models that stay loaded" if kept else ""
                raise InsufficientMemoryError(
                    f"the model `{name}` needs {what}; the memory budget is {human_bytes(budget)}{held}, so it cannot be "
                    f"loaded: raise --memory-budget, or lower --kv-cache-memory, --max-model-len or --max-running, or "
                    f"use --quantize",
                    need,
                    budget - kept,
                )
            if self.used() + need <= budget:
                return
            idle = [e for e in self.loaded.values() if not e.pinned and e.unloading is None and not e.busy()]
            if idle:
                victim = min(idle, key=lambda e: e.last_used)
                log.info("unloading %s to make room for %s", victim.name, name)
                await self._unload(victim)
                continue
            await self._changes()  # every model in the way is busy: wait for one to finish

    # ---- unloading ----

    async def stop(self, name: str | None) -> bool:
        """Unload `name` once its requests have ended (at once if it has none); False if it was not loaded."""
        name = self.resolve(name)
        load = self.loading.get(name)
        if load is not None and name not in self.loaded:
            self._cancel_load(load)
            with suppress(BaseException):
                await asyncio.shield(load.task)
        entry = self.loaded.get(name)
        if entry is None:
            return False
        if entry.pinned:
            raise InvalidRequestError(f"`{name}` is the model this server was started with: it stays loaded", param="model")
        entry.keep_alive = 0.0
        while entry.busy() and entry.unloading is None:
            await self._changes()
        await self._unload(entry)
        return True

    async def _unload(self, entry: Loaded) -> None:
        if entry.unloading is not None:
            return await asyncio.shield(entry.unloading)
        assert self._loop is not None
        entry.unloading = self._loop.create_future()
        try:
            await asyncio.to_thread(entry.worker.stop)
        finally:
            if self.loaded.get(entry.name) is entry:
                del self.loaded[entry.name]
            # What held the model goes; the handlers still formatting a finished answer hold their own refs.
            entry.llm = entry.service = entry.worker = None  # type: ignore[assignment]
            reclaim()
            entry.unloading.set_result(None)
            if self.metrics is not None:
                self.metrics.unloads.labels(entry.name).inc()
            log.info("unloaded %s", entry.name)
            self._notify()

    def _idle(self, entry: Loaded) -> None:
        """A model's leases and requests may all have ended: note when, and unload it if it keeps no time."""
        if entry.unloading is not None or self.loaded.get(entry.name) is not entry or entry.busy():
            return
        entry.last_used = self.clock()
        self._notify()
        if entry.keep_alive <= 0 and not entry.pinned:
            self._spawn(self._unload(entry))

    async def expire(self) -> None:
        """Unload every idle model whose keep-alive has run out (what the ticker does every `tick` seconds)."""
        now = self.clock()
        for entry in list(self.loaded.values()):
            if entry.pinned or entry.unloading is not None or entry.busy():
                continue
            if now >= entry.last_used + entry.keep_alive:
                await self._unload(entry)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self.expire()
            except Exception:
                log.exception("the keep-alive check failed")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _changes(self) -> None:
        await self._changed.wait()

    # ---- what is loaded ----

    def ps(self) -> list[dict[str, Any]]:
        """The loaded models, as `GET /api/ps` and `llmasos ps` show them."""
        now, wall, rows = self.clock(), time.time(), []
        for entry in sorted(self.entries(), key=lambda e: e.name):
            engine = entry.llm.engine
            forever = entry.pinned or entry.keep_alive == FOREVER
            left = entry.keep_alive if entry.busy() else max(0.0, entry.last_used + entry.keep_alive - now)
            on_gpu = engine.device.type == "cuda"
            rows.append(
                {
                    "name": entry.name,
                    "model": entry.name,
                    "size": entry.size,
                    "size_vram": entry.size if on_gpu else 0,
                    "weights_size": entry.weights_bytes,
                    "kv_cache_size": entry.kv_bytes,
                    "kv_cache_used": entry.kv_used(),
                    "running": entry.worker.num_running,
                    "waiting": entry.worker.num_waiting,
                    "context_length": engine.max_seq_len,
                    "device": str(engine.device),
                    "loaded_at": _iso(entry.loaded_at),
                    "load_seconds": round(entry.load_seconds, 3),
                    "keep_alive": -1 if forever else entry.keep_alive,
                    "expires_at": None if forever else _iso(wall + left),
                    "expires_in": None if forever else round(left, 3),
                }
            )
        return rows

    def budget_info(self) -> dict[str, Any]:
        return {"memory_budget": self.memory_budget, "memory_used": self.used()}
