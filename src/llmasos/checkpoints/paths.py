"""What a MODEL argument names: a path, or a model in the store, `$LLMASOS_HOME/models/NAME/`.

Only lookups live here, below the checkpoint formats (a LoRA adapter names its base model by a
store name too); `store.py` adds `pull`, which fills the store, and re-exports these.
"""

from __future__ import annotations

import re
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.outputs import home

# Checked with fullmatch: `$` also matches before a trailing newline, which let "evil\n" in.
NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")


def models_dir() -> Path:
    return home() / "models"


def stored_models() -> list[Path]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "config.json").exists())


def resolve(model: str | Path) -> Path:
    """A MODEL argument: a path to a model dir, or the name of a stored model."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    stored = models_dir() / str(model)
    if NAME.fullmatch(str(model)) and stored.is_dir():
        return stored
    names = ", ".join(p.name for p in stored_models()) or "none yet"
    raise LLMasOSError(
        f"no model {str(model)!r}: not a path, and not in the store {models_dir()} (stored: {names}); "
        f"import one with `llmasos pull SOURCE`"
    )
