"""Reading tensors out of weight files, one at a time, without ever holding the weights twice.

A safetensors tensor already in the wanted dtype is memory-mapped (copy-on-write): loading costs
nothing and its pages are shared with the page cache. One that needs converting is read with plain
`readinto` into a scratch buffer and cast, rather than through the `safetensors` library's mmap,
whose pages stay resident until the file is closed and would double the peak. Writing uses the
`safetensors` library.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmasos.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100_000_000  # the `safetensors` library's limit


@dataclass
class TensorEntry:
    """Where one tensor lives: a file, its dtype and shape, and (safetensors) its byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0
    tensor: torch.Tensor | None = None  # already in memory (pickled .bin / Meta .pth, memory-mapped)
    decode: Callable[[], torch.Tensor] | None = None  # computed when read (GGUF: dequantised, Q/K reordered)


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header and check it as the `safetensors` library does: a header of at most
    100 MB, known dtypes, shapes of non-negative sizes, and tensors whose byte ranges (dtype x shape long)
    lie back to back and cover the data exactly. Our messages name the file and the tensor (the library's
    often name neither); `test_weights.py` checks that the library refuses every file we refuse."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: not a safetensors file (a header of {header_len} bytes; the limit is {MAX_HEADER_BYTES})"
                )
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings, found {metadata!r:.100}")
    base = 8 + header_len
    entries = {name: _header_entry(path, name, info, base, size) for name, info in header.items()}
    end = base
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != end:
            raise CheckpointError(
                f"{path}: tensor {name} starts at byte {entry.start - base} of the data, expected "
                f"{end - base} (tensors must follow each other without overlaps or gaps)"
            )
        end = entry.end
    if end != size:
        raise CheckpointError(f"{path}: {size - end} bytes after the last tensor (not a safetensors file)")
    return entries


def _header_entry(path: Path, name: str, info: object, base: int, size: int) -> TensorEntry:
    """One tensor's header entry, checked; its offsets are relative to the data, which starts at `base`."""
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{path}: tensor {name}: expected an object with dtype, shape and data_offsets, found {info!r:.100}"
        )
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name} has shape {shape!r:.100}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets) and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name} has data_offsets {offsets!r:.100}, not [start, end] with 0 <= start <= end")
    start, end = offsets
    if end - start != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape {shape} {info['dtype']}")
    if base + end > size:
        raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to {base + end} but the file has {size}")
    return TensorEntry(path, dtype, tuple(shape), base + start, base + end)


def _is_size(value: object) -> bool:
    return type(value) is int and value >= 0  # JSON's true/false are not sizes


def read_pickled(path: Path) -> dict[str, TensorEntry]:
    """A `pytorch_model.bin` / `consolidated.NN.pth`: loaded with `weights_only=True` (no code runs), memory-mapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        if _is_legacy_pickle(path):
            raise CheckpointError(
                f"{path}: a PyTorch file in the legacy (pre-1.6, non-zip) format, which cannot be memory-mapped. "
                f"Convert the model to safetensors with transformers (AutoModelForCausalLM.from_pretrained(DIR)"
                f".save_pretrained(OUT, safe_serialization=True)), use the model's .safetensors files if it has "
                f"them, or re-save this file in the zip format: torch.save(torch.load(FILE, weights_only=True), "
                f"NEW_FILE)"
            ) from None
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: TensorEntry(path, v.dtype, tuple(v.shape), tensor=v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_legacy_pickle(path: Path) -> bool:
    """`torch.save(..., _use_new_zipfile_serialization=False)`'s format: a bare pickle (it opens with the
    pickle PROTO opcode) rather than a zip archive."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80" and not zipfile.is_zipfile(path)


def read_into(entry: TensorEntry, out: torch.Tensor, name: str = "") -> torch.Tensor:
    """Fill `out` (already of the target dtype/device) with the tensor's values."""
    if tuple(out.shape) != entry.shape:
        raise CheckpointError(f"{entry.file}: tensor {name} has shape {list(entry.shape)}, the model expects {list(out.shape)}")
    if entry.tensor is not None:
        return out.copy_(entry.tensor)
    if entry.decode is not None:
        return out.copy_(entry.decode())
    direct = out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous()
    buf = out if direct else torch.empty(entry.shape, dtype=entry.dtype)
    view = buf.view(torch.uint8).numpy() if buf.numel() else None
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if view is not None and f.readinto(memoryview(view).cast("B")) != entry.end - entry.start:
            raise CheckpointError(f"{entry.file}: truncated while reading tensor {name}")
    return out if direct else out.copy_(buf)


def load_tensor(
    entry: TensorEntry,
    dtype: torch.dtype | None = None,
    name: str = "",
    device: torch.device | str = "cpu",
    maps: dict[Path, mmap.mmap] | None = None,
) -> torch.Tensor:
    """The tensor in `dtype` on `device`: memory-mapped when nothing needs converting, else read and cast."""
    dtype = dtype or entry.dtype
    nbytes = entry.end - entry.start
    if (
        maps is not None
        and entry.tensor is None
        and entry.decode is None
        and dtype == entry.dtype
        and torch.device(device).type == "cpu"
        and nbytes
        and entry.start % dtype.itemsize == 0
    ):
        if entry.file not in maps:
            with open(entry.file, "rb") as f:
                maps[entry.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(maps[entry.file], dtype=torch.uint8, count=nbytes, offset=entry.start)
        return flat.view(dtype).view(entry.shape)
    return read_into(entry, torch.empty(entry.shape, dtype=dtype, device=device), name)


def save_safetensors_shards(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 * 2**30, prefix: str = "model"
) -> list[str]:
    """Write `tensors` as one `model.safetensors`, or shards with `model.safetensors.index.json` above the limit."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
        save_file(shards[0], out_dir / names[0], metadata=meta)
        return names
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, out_dir / fname, metadata=meta)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names
