"""`llmasos prepare`: clean, deduplicate, tokenize and pack a corpus into memory-mapped shards.

A data dir holds `train-NNNNN.bin` / `val-NNNNN.bin` (token ids, uint16 when the vocabulary fits,
else uint32, documents back to back, each as BOS + tokens + EOS) and `metadata.json` describing
them: tokenizer, vocabulary, dtype, token and document counts, shards, and the sources with their
SHA-256. Documents go to the validation split by a hash of their text, so the split is stable
across runs and worker counts.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmasos.checkpoints.gguf_vocab import tokenizer_source
from llmasos.checkpoints.store import resolve
from llmasos.data.sources import SourceStats, expand_inputs, iter_documents
from llmasos.errors import LLMasOSError
from llmasos.outputs import output_dir
from llmasos.progress import progress_bar
from llmasos.tokenization import Tokenizer

SHARD_TOKENS = 1 << 26  # 64 Mi tokens (128 MiB as uint16) per shard
_KEEP_CONTROLS = {"\n", "\t"}


def clean(text: str) -> str:
    """Unicode NFC; control characters removed (newlines and tabs kept; CRLF becomes LF)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    return "".join(ch for ch in text if ch in _KEEP_CONTROLS or unicodedata.category(ch) != "Cc")


@dataclass
class PrepareStats:
    documents_read: int = 0
    empty: int = 0
    duplicates: int = 0
    skipped: int = 0
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})


class ShardWriter:
    """Appends token arrays to numbered .bin shards of one split."""

    def __init__(self, out: Path, split: str, dtype: np.dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        if self._file is None or self._count >= SHARD_TOKENS:
            self._open()
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self._count += len(ids)
        self.shards[-1]["tokens"] = self._count

    def _open(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.out / name, "wb")
        self._count = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_source(tokenizer_path))


def _encode(texts: list[str]) -> list[list[int]]:
    tok = _worker_tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    return [bos + tok.encode(t, add_special_tokens=False) + eos for t in texts]


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(
    inputs: list[str | Path],
    tokenizer: str | Path,
    out: Path | str,
    val_fraction: float = 0.01,
    workers: int = 1,
    glob: str = "*",
    text_field: str = "text",
    on_error: str = "fail",
    progress: bool = True,
    force: bool = False,
) -> tuple[dict, PrepareStats, SourceStats]:
    """Write the data dir; returns its metadata and the counts for the summary.

    `out` may replace a data dir `llmasos prepare` wrote, anything else only with `force`; never an input."""

    if not 0 <= val_fraction < 1:
        raise LLMasOSError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    tokenizer_path = resolve(tokenizer)
    tok = Tokenizer(tokenizer_source(tokenizer_path))
    files = expand_inputs(inputs, glob)  # fail on a missing input before any work
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    stats, source_stats = PrepareStats(), SourceStats()
    seen: set[bytes] = set()
    split_of: list[str] = []

    def unique_clean_docs() -> Iterator[str]:
        for doc in iter_documents(files, text_field=text_field, on_error=on_error, stats=source_stats):
            stats.documents_read += 1
            text = clean(doc.text)
            if not text.strip():
                stats.empty += 1
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if digest in seen:
                stats.duplicates += 1
                continue
            seen.add(digest)
            split_of.append("val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train")
            yield text

    with output_dir(Path(out), [*inputs, tokenizer_path], force, "llmasos prepare") as tmp:
        writers = {s: ShardWriter(tmp, s, dtype) for s in ("train", "val")}
        bar = None
        if progress:
            bar = progress_bar(desc="tokenizing", unit="doc")
        batches = _batches(unique_clean_docs(), 64)
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),))
            encoded = pool.imap(_encode, batches)
        else:
            _init_worker(str(tokenizer_path))
            pool, encoded = None, map(_encode, batches)
        index = 0
        try:
            for ids_batch in encoded:
                for ids in ids_batch:
                    split = split_of[index]
                    index += 1
                    writers[split].write(np.asarray(ids, dtype=np.int64))
                    stats.documents[split] += 1
                    stats.tokens[split] += len(ids)
                if bar is not None:
                    bar.update(len(ids_batch))
        finally:
            if pool is not None:
                pool.terminate()
            for w in writers.values():
                w.close()
            if bar is not None:
                bar.close()
        if stats.tokens["train"] == 0:
            raise LLMasOSError("no training tokens: every document was empty, a duplicate or skipped")
        stats.skipped = source_stats.skipped
        metadata = {
            "format": "llmasos-packed-v1",
            "tokenizer": str(tokenizer_path),
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "splits": {
                s: {"tokens": stats.tokens[s], "documents": stats.documents[s], "shards": w.shards} for s, w in writers.items()
            },
            "sources": [{"path": str(f), "sha256": sha256_file(f)} for f in files],
            "stats": asdict(stats),
            "val_fraction": val_fraction,
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        tok.save(tmp / "tokenizer")
    return metadata, stats, source_stats


class PackedData:
    """A prepared split as one flat token sequence over memory-mapped shards."""

    def __init__(self, data_dir: Path | str, split: str = "train"):
        data_dir = Path(data_dir)
        meta_file = data_dir / "metadata.json"
        if not meta_file.exists():
            raise LLMasOSError(f"{data_dir}: not a prepared data dir (no metadata.json; run `llmasos prepare`)")
        self.metadata = json.loads(meta_file.read_text())
        if split not in self.metadata["splits"]:
            raise LLMasOSError(f"{data_dir}: no split {split!r}")
        dtype = np.dtype(self.metadata["dtype"])
        self.shards = [
            np.memmap(data_dir / s["file"], dtype=dtype, mode="r")
            for s in self.metadata["splits"][split]["shards"]
            if s["tokens"]
        ]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def tokens(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from global position `start` (may span shards)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {len(self)})")
        parts, pos = [], start
        while pos < start + length:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[i])
            take = min(start + length - pos, len(self.shards[i]) - local)
            parts.append(np.asarray(self.shards[i][local : local + take]))
            pos += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
