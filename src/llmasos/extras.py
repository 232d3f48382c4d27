"""The optional parts of LLMasOS and the packages each needs (`pip install 'llmasos[NAME]'`).

`pip install llmasos` is the lean core: the model, checkpoints (HF, Meta, GGUF), tokenizers and inference.
Whatever needs more says which extra to install, before any work, instead of failing on an import deep inside.
"""

from __future__ import annotations

import importlib.util

from llmasos.errors import LLMasOSError

# extra -> the modules that tell whether it is installed (the packages pyproject.toml lists for it)
EXTRAS = {
    "train": ("matplotlib", "tensorboard"),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "eval": ("sacrebleu",),  # lm-eval tasks also need `lm_eval`, checked where they run
    "export": ("onnx", "onnxscript", "onnxruntime"),
}


class MissingExtra(LLMasOSError, ImportError):
    """An optional part used without its packages: the message says which extra to install."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that cannot be imported, or one hidden in sys.modules
        return False


def require(extra: str, what: str) -> None:
    """Raise `MissingExtra` naming `what` and the extra unless every package of `extra` is installed."""
    missing = [m for m in EXTRAS[extra] if not installed(m)]
    if missing:
        raise MissingExtra(
            f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): pip install 'llmasos[{extra}]'"
        )
