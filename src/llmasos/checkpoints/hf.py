"""Hugging Face model dirs: `config.json` + safetensors (single or sharded) or `pytorch_model.bin`.

Reading here is of headers and configs only; `checkpoints.load` turns them into a model.
Saving writes what transformers loads; `checkpoints.export` writes any model we read as such a dir.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from llmasos.checkpoints.weights import TensorEntry, read_pickled, read_safetensors_header, save_safetensors_shards
from llmasos.errors import CheckpointError
from llmasos.models.config import ModelConfig
from llmasos.outputs import read_json
from llmasos.tokenization import copy_tokenizer_files


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


def state_dict_for_saving(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(
    model,
    out_dir: Path | str,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    tokenizer_dir: Path | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write an HF dir: config.json, safetensors (sharded above `max_shard_bytes`), generation and tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = state_dict_for_saving(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    stored = next(iter(state.values())).dtype
    config = dataclasses.replace(model.config, dtype=str(stored).removeprefix("torch."))  # the live model's is untouched
    save_safetensors_shards(state, out_dir, max_shard_bytes)
    (out_dir / "config.json").write_text(config.to_json() + "\n")
    write_generation_config(config, out_dir, generation_config)
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    return out_dir


def write_generation_config(config: ModelConfig, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    gen.update(extra or {})
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
