"""Hugging Face model dirs: `config.json` + safetensors (single or sharded) or `pytorch_model.bin`.

Loading builds the model on the meta device and reads each tensor straight into its final
dtype and device, so the weights are never held twice. Saving writes what transformers loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from llmasos.checkpoints.weights import (TensorEntry, read_into, read_pickled, read_safetensors_header,
                                         save_safetensors_shards)
from llmasos.errors import CheckpointError
from llmasos.models.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")
# Buffers some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    return ModelConfig.from_hf_config(read_json(model_dir / "config.json"), source=str(model_dir / "config.json"))


def weight_entries(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint and where it lives (headers only; no weights are read)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        entries: dict[str, TensorEntry] = {}
        for fname in sorted(set(weight_map.values())):
            shard = model_dir / fname
            if not shard.exists():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
            found = read_safetensors_header(shard)
            for name, f in weight_map.items():
                if f == fname and name not in found:
                    raise CheckpointError(f"{shard}: tensor {name} listed in {index.name} is not in this shard")
            entries.update(found)
        return entries
    single = model_dir / "model.safetensors"
    if single.exists():
        return read_safetensors_header(single)
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        entries = {}
        for shard in shards:
            entries.update(read_safetensors_header(shard))
        return entries
    binary = model_dir / "pytorch_model.bin"
    if binary.exists():
        return read_pickled(binary)
    if (model_dir / "pytorch_model.bin.index.json").exists():
        entries = {}
        for fname in sorted(set(read_json(model_dir / "pytorch_model.bin.index.json")["weight_map"].values())):
            entries.update(read_pickled(model_dir / fname))
        return entries
    raise CheckpointError(f"{model_dir}: no weights (model.safetensors, shards with an index, or pytorch_model.bin)")


def build_meta_model(config: ModelConfig):
    from llmasos.models.llama import Transformer

    with torch.device("meta"):
        return Transformer(config)


def check_entries(model: torch.nn.Module, entries: dict[str, TensorEntry], where: Path) -> None:
    """Missing, unexpected or mis-shaped tensors, each named with its file."""
    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        entries.pop("lm_head.weight", None)  # some tied checkpoints store it too; the tie wins, as in transformers
    for name in list(entries):
        if name.endswith(IGNORED_SUFFIXES):
            entries.pop(name)
    missing = [n for n in expected if n not in entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing from the checkpoint{more}")
    unexpected = [n for n in entries if n not in expected]
    if unexpected:
        raise CheckpointError(
            f"{entries[unexpected[0]].file}: unexpected tensor {unexpected[0]} (not part of a "
            f"{model.config.architecture} with this config.json)"
        )
    for name, t in expected.items():
        if tuple(t.shape) != entries[name].shape:
            raise CheckpointError(
                f"{entries[name].file}: tensor {name} has shape {list(entries[name].shape)}, "
                f"config.json implies {list(t.shape)}"
            )


def materialize(model, entries: dict[str, TensorEntry], dtype: torch.dtype | None, device, where: Path,
                progress: bool = False):
    """Fill a meta-device model from `entries`, tensor by tensor, in `dtype` (default: as stored)."""
    check_entries(model, entries, where)
    state = {}
    items = list(model.state_dict().items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="loading weights", unit="tensor", leave=False)
    for name, meta in items:
        if name not in entries:  # tied lm_head
            continue
        entry = entries[name]
        want = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
        state[name] = read_into(entry, torch.empty(meta.shape, dtype=want, device=device), name)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.rotary.reset(device)
    return model


def load_model(model_dir: Path | str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               progress: bool = False):
    """A `Transformer` with the weights of an HF dir, in `dtype` (default: the stored dtype)."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    model = build_meta_model(config)
    materialize(model, weight_entries(model_dir), dtype, device, model_dir, progress)
    return model.eval()


def state_dict_for_saving(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(model, out_dir: Path | str, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None,
               tokenizer_dir: Path | None = None, generation_config: dict[str, Any] | None = None) -> Path:
    """Write an HF dir: config.json, safetensors (sharded above `max_shard_bytes`), generation and tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = state_dict_for_saving(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    stored = next(iter(state.values())).dtype
    config = model.config
    config.dtype = str(stored).removeprefix("torch.")
    save_safetensors_shards(state, out_dir, max_shard_bytes)
    (out_dir / "config.json").write_text(config.to_json() + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    gen.update(generation_config or {})
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    return out_dir


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
