"""Running tasks on a model: batched generation through the engine, log-likelihoods by batched
forward passes, one `Result` row per task and metric; the JSON results file and the tables."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.evaluation import metrics
from llmasos.evaluation.tasks import Task, TaskError, load_task

LM_EVAL_PREFIX = "lm_eval:"


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


@dataclass
class Plan:
    """The checked work of one run, ready before the model is loaded."""

    tasks: list[Task]
    lm_eval_tasks: list[str]
    lm_eval_manager: object | None = None  # lm-eval's TaskManager that knows lm_eval_tasks


def plan(config: EvalConfig) -> Plan:
    """Load and check every task (and the perplexity source's existence) before any model work."""
    ours = [load_task(t) for t in config.tasks if not t.startswith(LM_EVAL_PREFIX)]
    theirs = [t[len(LM_EVAL_PREFIX):] for t in config.tasks if t.startswith(LM_EVAL_PREFIX)]
    if config.num_fewshot is not None:
        for task in ours:
            task.fewshot_prefix(config.num_fewshot)  # refuses more shots than the task has
    manager = None
    if theirs:
        from llmasos.evaluation.harness import check_tasks

        manager = check_tasks(theirs, config.include_path)
    if config.perplexity and not Path(config.perplexity).exists():
        raise LLMasOSError(f"{config.perplexity}: no such text file or prepared data dir")
    return Plan(ours, theirs, manager)


def evaluate(llm, config: EvalConfig, model_name: str, work: Plan | None = None, progress: bool = True) -> list[Result]:
    """Every task of `config` on `llm` (as planned by `plan`); rows in task order, then the perplexity row."""
    work = work or plan(config)
    rows: list[Result] = []
    for task in work.tasks:
        rows += run_task(llm, task, config, model_name, progress)
    if work.lm_eval_tasks:
        from llmasos.evaluation.harness import run_lm_eval

        rows += run_lm_eval(llm, work.lm_eval_tasks, work.lm_eval_manager, config, model_name)
    if config.perplexity:
        rows.append(run_perplexity(llm, config, model_name, progress))
    return rows


def run_task(llm, task: Task, config: EvalConfig, model_name: str, progress: bool = True) -> list[Result]:
    from llmasos.evaluation.scoring import encode_pair, loglikelihoods

    t0 = time.perf_counter()
    shots = task.num_fewshot if config.num_fewshot is None else config.num_fewshot
    prefix = task.fewshot_prefix(shots)
    examples = task.examples(config.limit)
    score = {"batch_size": config.batch_size, "progress": progress}
    scores: dict[str, metrics.Score]
    if task.kind == "multiple_choice":
        pairs = [encode_pair(llm.tokenizer, prefix + e.prompt, task.target_delimiter + c)
                 for e in examples for c in e.choices]
        lls = iter(loglikelihoods(llm.model, pairs, **score))
        acc, acc_norm = [], []
        for e in examples:
            ll = [next(lls)[0] for _ in e.choices]
            normed = [v / max(1, len(c)) for v, c in zip(ll, e.choices)]  # per character, as lm-eval's acc_norm
            acc.append(float(max(range(len(ll)), key=ll.__getitem__) == e.answer))
            acc_norm.append(float(max(range(len(ll)), key=normed.__getitem__) == e.answer))
        scores = {"acc": metrics.mean(acc), "acc_norm": metrics.mean(acc_norm)}
    else:
        from llmasos import SamplingParams

        params = SamplingParams(**{"max_tokens": 32, "temperature": 0.0, **task.generation})
        prompts = [llm.tokenizer.encode(prefix + e.prompt) for e in examples]
        context = llm.engine.max_seq_len
        for i, ids in enumerate(prompts):
            if len(ids) + (params.max_tokens or 1) > context:
                raise TaskError(f"{task.name}: example {i + 1} has a prompt of {len(ids)} tokens; with max_tokens "
                                f"{params.max_tokens} it exceeds the model's context of {context} tokens (use fewer "
                                "few-shot examples: --num-fewshot)")
        outputs = llm.generate(prompts, params, progress=progress)
        predictions = [o.text.strip() for o in outputs]
        references = [e.references for e in examples]
        scores = metrics.generative_scores(task.metrics, predictions, references)
        if "perplexity" in task.metrics:
            pairs = [encode_pair(llm.tokenizer, prefix + e.prompt, task.target_delimiter + e.references[0])
                     for e in examples]
            lls = loglikelihoods(llm.model, pairs, **score)
            scores["perplexity"] = metrics.perplexity([v for v, _ in lls], [len(c) for _, c in pairs])
    seconds = time.perf_counter() - t0
    digest = task.config_hash(limit=config.limit, num_fewshot=shots)
    return [Result(model_name, task.name, m, scores[m].value, scores[m].stderr, len(examples), digest, seconds)
            for m in task.metrics]


def run_perplexity(llm, config: EvalConfig, model_name: str, progress: bool = True) -> Result:
    import hashlib

    import numpy as np

    from llmasos.evaluation.scoring import perplexity_tokens, sliding_perplexity

    t0 = time.perf_counter()
    ids = perplexity_tokens(config.perplexity, llm.tokenizer, llm.config.vocab_size)
    window = llm.config.max_position_embeddings
    result = sliding_perplexity(llm.model, ids, max_length=window, stride=config.stride,
                                batch_size=config.batch_size, progress=progress)
    digest = hashlib.sha256(json.dumps([window, config.stride]).encode() + np.asarray(ids, np.int64).tobytes())
    digest = digest.hexdigest()[:12]
    return Result(model_name, f"perplexity:{Path(config.perplexity).name}", "perplexity", result.perplexity,
                  None, result.tokens, digest, time.perf_counter() - t0)


# ---- files and tables ---------------------------------------------------------------------------------


def check_results_path(path: Path, inputs: Iterable[Path | str | None], force: bool) -> None:
    """Before any work: `eval --out` may replace a results file it wrote, anything else only with force;
    never an input, and never a directory."""
    from llmasos.outputs import check_output

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
    from rich.table import Table

    table = Table(title=f"Evaluation of {rows[0].model}" if rows else "Evaluation", title_justify="left")
    for col in ("task", "metric", "value", "± stderr", "samples", "seconds", "config"):
        table.add_column(col, justify="left" if col in ("task", "metric", "config") else "right",
                         no_wrap=col in ("task", "metric"))
    for r in rows:
        table.add_row(r.task, r.metric, _fmt(r.value), _fmt(r.stderr), str(r.samples), f"{r.seconds:.1f}",
                      r.config_hash)
    return table


def compare_table(files: list[str | Path]):
    """Models side by side, one row per task and metric; a † marks a value from a different task config."""
    from rich.table import Table

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
