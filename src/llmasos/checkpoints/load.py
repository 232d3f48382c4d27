"""From a checkpoint on disk to a `Transformer`, whatever the format.

The model is built on the meta device and each tensor is read straight into its final dtype and
device, so the weights are never held twice.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from llmasos.checkpoints.gguf import read_gguf
from llmasos.checkpoints.hf import load_config, weight_entries
from llmasos.checkpoints.meta import is_meta_dir, read_meta_checkpoint
from llmasos.checkpoints.paths import resolve
from llmasos.checkpoints.weights import TensorEntry, load_tensor
from llmasos.errors import CheckpointError
from llmasos.models.config import ModelConfig
from llmasos.models.llama import Transformer
from llmasos.models.lora import ADAPTER_CONFIG, load_adapter, merge_lora
from llmasos.progress import progress_bar

# Buffers some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def open_checkpoint(path: Path | str) -> tuple[ModelConfig, dict[str, TensorEntry]]:
    """The config and tensor index of an HF dir, a Meta checkpoint dir or a GGUF file (no weights are read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / ADAPTER_CONFIG).exists():  # a PEFT LoRA adapter: its base model's config and weights
        return open_checkpoint(adapter_base(path))
    if is_meta_dir(path):
        return read_meta_checkpoint(path)
    if path.is_dir() and (path / "config.json").exists():
        return load_config(path), weight_entries(path)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(path)
    raise CheckpointError(
        f"{path}: not a model (expected a dir with config.json + weights, or params.json + consolidated.*.pth, or a .gguf file)"
    )


def uniform_dtype(config: ModelConfig, entries: dict[str, TensorEntry]) -> torch.dtype | None:
    """None when every float tensor is stored in one dtype; else the config's (a GGUF keeps norms in F32
    beside F16 or quantized matrices, and a model computes in one dtype)."""
    if len({e.dtype for e in entries.values() if e.dtype.is_floating_point}) <= 1:
        return None
    dtype = getattr(torch, config.dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def adapter_base(adapter_dir: Path) -> Path:
    """The base model of a PEFT adapter dir (`base_model_name_or_path`: a model dir or a stored name)."""
    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: no readable base_model_name_or_path ({e})") from None
    return resolve(base)


_SKIP_INIT = threading.Lock()
INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_", "constant_")


def build_meta_model(config: ModelConfig) -> Transformer:
    """The model's modules on the meta device, for weights loaded next. Their initialisation is skipped, as
    transformers' `no_init_weights` does: on meta tensors PyTorch's init functions import torch._dynamo,
    which cost 2-3 s of every cold start (a `llmasos generate` spent most of its first seconds there)."""
    # One build at a time (the model pool loads on worker threads): two interleaved would save each other's
    # no-ops as the originals and leave torch's init functions switched off for the whole process.
    with _SKIP_INIT:
        saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
        try:
            for name in INIT_FUNCTIONS:
                setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            with torch.device("meta"):
                return Transformer(config)
        finally:
            for name, function in saved.items():
                setattr(torch.nn.init, name, function)


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
            f"{model.config.architecture} with this config)"
        )
    for name, t in expected.items():
        if tuple(t.shape) != entries[name].shape:
            raise CheckpointError(
                f"{entries[name].file}: tensor {name} has shape {list(entries[name].shape)}, the config implies {list(t.shape)}"
            )


def materialize(model, entries: dict[str, TensorEntry], dtype: torch.dtype | None, device, where: Path, progress: bool = False):
    """Fill a meta-device model from `entries`, tensor by tensor, in `dtype` (default: as stored).

    Tensors already in `dtype` are memory-mapped copy-on-write: training may update them in place."""
    check_entries(model, entries, where)
    state = {}
    items = [(n, t) for n, t in model.state_dict().items() if n in entries]  # a tied lm_head is not
    if progress:
        items = progress_bar(items, desc="loading weights", unit="tensor", leave=False)
    maps = {}  # one copy-on-write mapping per safetensors file, kept alive by the tensors that view it
    for name, _ in items:
        entry = entries[name]
        want = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
        state[name] = load_tensor(entry, want, name, device, maps)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.rotary.reset(device)
    return model


def load_model(path: Path | str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", progress: bool = False):
    """A `Transformer` with the weights of an HF or Meta dir or a GGUF file, in `dtype` (default: as stored),
    in eval mode."""
    config, entries = open_checkpoint(path)
    model = build_meta_model(config)
    materialize(model, entries, dtype or uniform_dtype(config, entries), device, Path(path), progress)
    if (Path(path) / ADAPTER_CONFIG).exists():  # fold the adapter in: inference then costs what the base does
        model = merge_lora(load_adapter(model, Path(path)))
    return model.eval()
