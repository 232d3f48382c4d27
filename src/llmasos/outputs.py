"""What a command may write, and how: nothing a user owns is deleted or overwritten.

An output is refused when it is, or contains, one of the command's inputs (always: replacing it
would destroy what it is made from), and when it holds something the command did not write there
(unless `--force`). A dir LLMasOS writes carries a marker file, `.llmasos`, naming the command that
wrote it; a rerun of that command may replace it. Outputs are written under a temporary name
beside the target and renamed into place, so a failed or interrupted command leaves nothing
half-written.

The small file helpers every package may use live here too, at the bottom of the package graph:
`home` (where LLMasOS keeps its store and caches), `read_json` and `atomic_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from llmasos.errors import CheckpointError, LLMasOSError

MARKER = ".llmasos"


def home() -> Path:
    """`$LLMASOS_HOME` (default `~/.cache/llmasos`): the model store and caches."""
    return Path(os.environ.get("LLMASOS_HOME", "~/.cache/llmasos")).expanduser()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; a missing, malformed or non-object file is a `CheckpointError` naming it."""
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


def written_by(path: Path) -> str | None:
    """The command whose marker dir `path` carries (None: no marker, so not known to be ours)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    return (marker.read_text(errors="replace").splitlines() or [""])[0].strip()


def mark(path: Path, command: str) -> None:
    """Create dir `path` if needed and mark it as `command`'s output."""
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(f"{command}\n# LLMasOS wrote this dir; a rerun of the command above may replace it.\n")


def check_inputs(out: Path, inputs: Iterable[Path | str | None]) -> None:
    """Refuse an output that is or contains an input (--force does not change this). Inputs that do not
    exist (yet) cannot be harmed and are reported missing by the command itself."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if not given or not Path(given).expanduser().exists():
            continue
        path = Path(given).expanduser().resolve()
        if target == path or target in path.parents:
            what = "is" if target == path else "contains"
            raise LLMasOSError(
                f"the output {out} {what} the input {given}: writing it would destroy the input "
                f"(even with --force); choose another --out"
            )


def check_output(
    out: Path, inputs: Iterable[Path | str | None], force: bool, command: str, owned: Callable[[Path], bool] | None = None
) -> None:
    """Refuse `out` if it is or contains an input, or (unless force) if it exists, is not an empty dir, and
    `owned` (default: it carries `command`'s marker) does not say the command wrote it."""
    check_inputs(out, inputs)
    if force or not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if (owned or (lambda path: written_by(path) == command))(out):
        return
    what = (
        f"is not an empty dir or one `{command}` wrote (its {MARKER} marker)"
        if out.is_dir()
        else f"is not known to be an output of `{command}`"
    )
    raise LLMasOSError(f"{out} already exists and {what}: choose another --out, or pass --force to replace it")


def remove(path: Path) -> None:
    """Delete a file, link or dir tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary dir beside `final`; on success it becomes `final`, on failure it is removed."""
    if final.exists() and not replace:
        raise LLMasOSError(f"{final} already exists (use --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        with contextlib.suppress(OSError):  # the new output is in place; a leftover is no failure
            remove(old)


@contextlib.contextmanager
def output_dir(out: Path, inputs: Iterable[Path | str | None], force: bool, command: str) -> Iterator[Path]:
    """A command's output dir: checked now (`check_output`), written into the yielded temporary dir, marked as
    `command`'s, and renamed into place when the block succeeds."""
    out = Path(out)
    check_output(out, inputs, force, command)
    with atomic_dir(out, replace=True) as tmp:
        yield tmp
        mark(tmp, command)
