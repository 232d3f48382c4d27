"""Reading tensors out of weight files, one at a time, without ever holding the weights twice.

A safetensors tensor already in the wanted dtype is memory-mapped (copy-on-write): loading costs
nothing and its pages are shared with the page cache. One that needs converting is read with plain
`readinto` into a scratch buffer and cast, rather than through the `safetensors` library's mmap,
whose pages stay resident until the file is closed and would double the peak. Writing uses the
`safetensors` library.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmasos.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


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
    """Parse a safetensors header and check that every tensor's bytes are inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (bad header: {e})") from None
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes for shape {list(shape)} {info['dtype']}")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} needs bytes up to {base + end} but the file has {size}"
            )
        entries[name] = TensorEntry(path, dtype, shape, base + start, base + end)
    return entries


def read_pickled(path: Path) -> dict[str, TensorEntry]:
    """A `pytorch_model.bin` / `consolidated.NN.pth`: loaded with `weights_only=True` (no code runs), memory-mapped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file not found") from None
    except Exception as e:  # torch raises several types for corrupt or unsafe pickles
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: TensorEntry(path, v.dtype, tuple(v.shape), tensor=v) for k, v in state.items() if isinstance(v, torch.Tensor)}


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


def load_tensor(entry: TensorEntry, dtype: torch.dtype | None = None, name: str = "",
                device: torch.device | str = "cpu", maps: dict[Path, mmap.mmap] | None = None) -> torch.Tensor:
    """The tensor in `dtype` on `device`: memory-mapped when nothing needs converting, else read and cast."""
    dtype = dtype or entry.dtype
    nbytes = entry.end - entry.start
    if (maps is not None and entry.tensor is None and entry.decode is None and dtype == entry.dtype
            and torch.device(device).type == "cpu" and nbytes and entry.start % dtype.itemsize == 0):
        if entry.file not in maps:
            with open(entry.file, "rb") as f:
                maps[entry.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(maps[entry.file], dtype=torch.uint8, count=nbytes, offset=entry.start)
        return flat.view(dtype).view(entry.shape)
    return read_into(entry, torch.empty(entry.shape, dtype=dtype, device=device), name)


def save_safetensors_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 * 2**30,
                            prefix: str = "model") -> list[str]:
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

