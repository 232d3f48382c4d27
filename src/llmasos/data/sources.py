"""Reading documents out of user files: text files, directories, JSONL and Parquet.

Every malformed input is reported as file:line and reason. With on_error="fail" (the default) the
first one stops the run; with "skip" it is counted in `SourceStats` and reading goes on. Nothing is
dropped without being counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmasos.errors import LLMasOSError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class Document:
    text: str
    source: str  # "file" or "file:line"


@dataclass
class SourceStats:
    files: int = 0
    documents: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skip reasons, for the summary


class InputError(LLMasOSError):
    """A malformed input record: the message starts with file:line."""


def expand_inputs(inputs: list[str | Path], glob: str = "*") -> list[Path]:
    """Files named directly, and the files under directories (recursively, matching `glob`), sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.rglob(glob) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise LLMasOSError(f"{path}: no files matching {glob!r} in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LLMasOSError(f"{path}: no such file or directory")
    return files


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str | None, str, str | None]]:
    """(text, where, error) per line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as e:
                yield None, where, f"not UTF-8 ({e.reason} at byte {e.start})"
                continue
            except json.JSONDecodeError as e:
                yield None, where, f"not valid JSON ({e.msg}, column {e.colno})"
                continue
            if not isinstance(record, dict):
                yield None, where, f"expected a JSON object, found {type(record).__name__}"
            elif text_field not in record:
                yield None, where, f"no field {text_field!r} (fields: {', '.join(record) or 'none'})"
            elif not isinstance(record[text_field], str):
                yield None, where, f"field {text_field!r} is {type(record[text_field]).__name__}, not a string"
            else:
                yield record[text_field], where, None


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str | None, str, str | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LLMasOSError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for damaged files
        raise LLMasOSError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise LLMasOSError(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield value, f"{path}:row {row}", None
            else:
                yield None, f"{path}:row {row}", f"column {text_field!r} is {type(value).__name__}, not a string"


def _read_text(path: Path) -> Iterator[tuple[str | None, str, str | None]]:
    data = path.read_bytes()
    try:
        yield data.decode("utf-8"), str(path), None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        yield None, f"{path}:{line}", f"not UTF-8 ({e.reason} at byte {e.start})"


def iter_documents(
    inputs: list[str | Path], glob: str = "*", text_field: str = "text", on_error: str = "fail", stats: SourceStats | None = None
) -> Iterator[Document]:
    """Documents from text files (one per file), JSONL (one per line) and Parquet (one per row)."""
    if on_error not in ("fail", "skip"):
        raise LLMasOSError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    stats = stats if stats is not None else SourceStats()
    for path in expand_inputs(inputs, glob):
        stats.files += 1
        suffix = path.suffix.lower()
        if suffix in JSON_SUFFIXES:
            records = _read_jsonl(path, text_field)
        elif suffix == ".parquet":
            records = _read_parquet(path, text_field)
        else:
            records = _read_text(path)
        for text, where, error in records:
            if error is not None:
                if on_error == "fail":
                    raise InputError(f"{where}: {error} (use --on-error skip to skip and count such records)")
                stats.skipped += 1
                if len(stats.errors) < 5:
                    stats.errors.append(f"{where}: {error}")
                continue
            stats.documents += 1
            yield Document(text, where)
