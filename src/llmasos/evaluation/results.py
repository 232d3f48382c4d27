"""What an evaluation is asked (`EvalConfig`) and what it gives (`Result` rows, one per task and
metric); the JSON results file `llmasos eval --out` writes, and the tables that show results."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from llmasos.errors import LLMasOSError
from llmasos.outputs import check_output


@dataclass
class Result:
    model: str
    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int
    config_hash: str
    seconds: float


@dataclass
class EvalConfig:
    """What `llmasos eval` runs. tasks: built-in names, YAML paths or lm_eval:TASK."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = None  # the first N examples of each task
    batch_size: int = 16
    num_fewshot: int | None = None  # None: each task's own num_fewshot
    include_path: str | None = None  # more lm-eval task YAMLs
    perplexity: str | None = None  # a text file or a prepared data dir
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise LLMasOSError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise LLMasOSError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.tasks and not self.perplexity:
            raise LLMasOSError("nothing to evaluate: give --tasks and/or --perplexity")


# ---- files and tables ---------------------------------------------------------------------------------


def check_results_path(path: Path, inputs: Iterable[Path | str | None], force: bool) -> None:
    """Before any work: `eval --out` may replace a results file it wrote, anything else only with force;
    never an input, and never a directory."""
    check_output(path, inputs, force, "llmasos eval", owned=is_results_file)
    if path.is_dir():
        raise LLMasOSError(f"--out {path} is a directory: name the results file to write")


def is_results_file(path: Path) -> bool:
    """Whether `path` holds results `llmasos eval --out` wrote (so a rerun may replace it)."""
    try:
        read_results(path)
    except (LLMasOSError, OSError, ValueError):
        return False
    return True


def write_results(rows: list[Result], path: Path | str, model: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"model": model, "results": [asdict(r) for r in rows]}, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_results(path: Path | str) -> list[Result]:
    path = Path(path)
    try:
        rows = json.loads(path.read_text())["results"]
        return [Result(**r) for r in rows]
    except FileNotFoundError:
        raise LLMasOSError(f"{path}: no such results file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LLMasOSError(f"{path}: not a results file written by `llmasos eval --out` ({e})") from None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def results_table(rows: list[Result]):
    table = Table(title=f"Evaluation of {rows[0].model}" if rows else "Evaluation", title_justify="left")
    for col in ("task", "metric", "value", "± stderr", "samples", "seconds", "config"):
        table.add_column(
            col, justify="left" if col in ("task", "metric", "config") else "right", no_wrap=col in ("task", "metric")
        )
    for r in rows:
        table.add_row(r.task, r.metric, _fmt(r.value), _fmt(r.stderr), str(r.samples), f"{r.seconds:.1f}", r.config_hash)
    return table


def compare_table(files: list[str | Path]):
    """Models side by side, one row per task and metric; a † marks a value from a different task config."""
    if len(files) < 2:
        raise LLMasOSError("compare needs at least two results files")
    runs = [(Path(f), read_results(f)) for f in files]
    keys: list[tuple[str, str]] = []
    for _, rows in runs:
        keys += [(r.task, r.metric) for r in rows if (r.task, r.metric) not in keys]
    table = Table(title="Comparison", title_justify="left")
    table.add_column("task")
    table.add_column("metric")
    for path, rows in runs:
        table.add_column(f"{rows[0].model}\n{path.name}" if rows else path.name, justify="right")
    for task, metric in keys:
        found = [next((r for r in rows if (r.task, r.metric) == (task, metric)), None) for _, rows in runs]
        hashes = {r.config_hash for r in found if r is not None}
        mark = " †" if len(hashes) > 1 else ""
        table.add_row(task, metric, *("-" if r is None else _fmt(r.value) + mark for r in found))
    return table
