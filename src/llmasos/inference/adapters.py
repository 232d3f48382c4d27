"""LoRA adapters on an engine's model, loaded and unloaded while it runs (`models.multi_lora` does the arithmetic).

Every call here changes the model, so it runs where the engine runs, between two steps: directly from the
Python API, on the engine's thread in the server. Unloading takes the name away at once; the weights go
when no queued or running request uses them any more (`collect`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmasos.errors import LLMasOSError
from llmasos.models.multi_lora import Adapter, AdapterSet, read_adapter_for

if TYPE_CHECKING:
    from llmasos.inference.engine import Engine


def find(model, name: str | None) -> Adapter | None:
    """The adapter loaded under `name` (None: the base model), or an error listing those loaded."""
    if name is None:
        return None
    adapter = get(model, name)
    if adapter is None:
        raise LLMasOSError(f"no LoRA adapter named {name!r} is loaded (loaded: {', '.join(names(model)) or 'none'})")
    return adapter


def get(model, name: str) -> Adapter | None:
    """The adapter loaded under `name`, if any (safe from any thread: it only reads)."""
    found = model.__dict__.get("lora_adapters")
    return found.get(name) if found is not None else None


def loaded(model) -> list[Adapter]:
    """The adapters loaded, by name (safe from any thread: it only reads)."""
    found = model.__dict__.get("lora_adapters")
    return sorted(tuple(found.named.values()), key=lambda a: a.name) if found is not None else []


def names(model) -> list[str]:
    return [a.name for a in loaded(model)]


def load(engine: Engine, name: str, path: Path | str) -> Adapter:
    """Read the adapter dir at `path`, check it fits the model, and load it as `name`."""
    if not isinstance(name, str) or not name.strip():
        raise LLMasOSError("an adapter needs a name")
    if get(engine.model, name) is not None:
        raise LLMasOSError(f"an adapter named {name!r} is already loaded")
    adapter = read_adapter_for(engine.model, name, path)
    AdapterSet.of(engine.model).add(adapter)
    return adapter


def unload(engine: Engine, name: str) -> Adapter:
    """Take the adapter `name` away: no new request may use it; its weights go once no request does."""
    adapter = AdapterSet.of(engine.model).retire(name)
    collect(engine)
    return adapter


def collect(engine: Engine) -> bool:
    """Free the unloaded adapters no request uses any more; True while some are still in use."""
    adapters = AdapterSet.of(engine.model)
    adapters.collect(in_use(engine))
    return any(a.retired for a in adapters.stacked)


def in_use(engine: Engine) -> set[Adapter]:
    """The adapters of the requests queued or running in `engine` (generation and embeddings)."""
    used = {r.adapter for r in engine.requests.values()} | {r.adapter for r in engine.embedder.requests.values()}
    used.discard(None)
    return used  # type: ignore[return-value]
