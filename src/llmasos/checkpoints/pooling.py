"""How a model's hidden states become one embedding: the pooling its files name, if any.

Two conventions say it. A sentence-transformers model dir lists its modules in `modules.json`; its Pooling
module's `config.json` turns on one `pooling_mode_*` (mean, last token, CLS, max). A GGUF file carries
`{arch}.pooling_type` (llama.cpp's numbering: 1 mean, 2 CLS, 3 last). A model that names none is mean-pooled,
as Ollama and llama.cpp pool a plain LLaMA. `pull` keeps the pooling a source names, written the
sentence-transformers way, so a stored model embeds as its source did.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmasos.errors import CheckpointError

POOLINGS = ("mean", "last", "cls", "max")
DEFAULT_POOLING = "mean"
# sentence-transformers' Pooling config key for each mode we compute.
ST_MODES = {
    "mean": "pooling_mode_mean_tokens",
    "last": "pooling_mode_lasttoken",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
}
ST_OTHER_MODES = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
GGUF_POOLINGS = {1: "mean", 2: "cls", 3: "last"}  # llama.cpp's LLAMA_POOLING_TYPE_*; 0 (none) names no pooling
MODULES, POOLING_DIR, NORMALIZE_DIR = "modules.json", "1_Pooling", "2_Normalize"
POOLING_FILES = (MODULES, "*Pooling/config.json")  # what a hub download needs of them


def read_pooling(path: Path | str) -> str | None:
    """The pooling the model at `path` names (one of POOLINGS), or None when it names none. A pooling we cannot
    compute (several modes at once, weighted mean, rank) is an error naming the file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_pooling(path)
    if not (path / MODULES).is_file():
        return None
    modules = _json(path / MODULES)
    if not isinstance(modules, list):
        raise CheckpointError(f"{path / MODULES}: expected a list of modules")
    pooling = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")]
    if not pooling:
        return None
    config_file = path / str(pooling[0].get("path", "")) / "config.json"
    config = _json(config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    on = [mode for mode, key in ST_MODES.items() if config.get(key)] + [key for key in ST_OTHER_MODES if config.get(key)]
    if len(on) > 1 or (on and on[0] not in POOLINGS):
        raise CheckpointError(
            f"{config_file}: pooling {' + '.join(on)} is not supported; embeddings are pooled by one of "
            f"{', '.join(ST_MODES[p] for p in POOLINGS)}"
        )
    return on[0] if on else None


def _json(file: Path):
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def _gguf_pooling(path: Path) -> str | None:
    from llmasos.checkpoints.gguf import open_reader, read_field

    reader = open_reader(path)
    value = read_field(reader, f"{read_field(reader, 'general.architecture')}.pooling_type")
    if value is None or value == 0:
        return None
    if value not in GGUF_POOLINGS:
        raise CheckpointError(
            f"{path}: pooling_type {value!r} is not supported; embeddings are pooled by mean (1), cls (2) or last (3)"
        )
    return GGUF_POOLINGS[value]


def write_pooling(out: Path, pooling: str, dimension: int) -> None:
    """Name `pooling` in the model dir `out` as sentence-transformers does (modules.json, the Pooling module's
    config, L2 normalisation after it)."""
    if pooling not in POOLINGS:
        raise CheckpointError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"},
    ]
    (out / MODULES).write_text(json.dumps(modules, indent=2) + "\n")
    (out / POOLING_DIR).mkdir(exist_ok=True)
    config = {"word_embedding_dimension": dimension, **{key: mode == pooling for mode, key in ST_MODES.items()}}
    config.update({key: False for key in ST_OTHER_MODES})
    (out / POOLING_DIR / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / NORMALIZE_DIR).mkdir(exist_ok=True)


def copy_pooling(src: Path, out: Path, dimension: int) -> None:
    """Keep in `out` (an imported model dir) the pooling `src` names, if it names one."""
    pooling = read_pooling(src)
    if pooling is not None:
        write_pooling(out, pooling, dimension)
