"""`Task`: one evaluation (and fine-tuning) task described by a YAML file; the built-in task files
live beside this module.

A task names its data (a local .jsonl/.json/.csv file next to the YAML, or `hub:NAME` for a
Hugging Face dataset), Jinja templates over the data's fields, optional few-shot examples, the
generation settings and the metrics. Everything is checked when the task is loaded (unknown keys,
missing files, template fields the data lacks), so a mistake is reported before any model work.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from llmasos.errors import LLMasOSError

BUILTIN_DIR = Path(__file__).parent
KINDS = ("generation", "translation", "qa", "multiple_choice")
GENERATIVE_METRICS = ("perplexity", "exact_match", "f1", "bleu", "chrf")
METRICS = {  # kind -> (allowed metrics, default metrics)
    "generation": (GENERATIVE_METRICS, ["perplexity", "chrf"]),
    "translation": (GENERATIVE_METRICS, ["bleu", "chrf"]),
    "qa": (GENERATIVE_METRICS, ["exact_match", "f1"]),
    "multiple_choice": (("acc", "acc_norm"), ["acc", "acc_norm"]),
}
GENERATION_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")  # SamplingParams fields


class TaskError(LLMasOSError):
    """A task that cannot be used: unknown name, bad YAML key, missing data, a template field the data lacks."""


@dataclass
class Example:
    """One rendered evaluation item. references: accepted answers; choices/answer: multiple choice only."""

    prompt: str
    references: list[str]
    choices: list[str] | None = None
    answer: int | None = None


@dataclass
class Task:
    """A task file's keys (see the README's "Evaluation" section); `load_task` builds and checks one."""

    kind: str
    data: str  # a file relative to the YAML, or "hub:NAME"
    prompt: str  # Jinja template: the text the model continues
    target: str  # Jinja template: the reference; a bare "{{ field }}" naming a list gives several references
    name: str = ""  # default: the file's stem
    description: str = ""
    choices: str | list[str] | None = None  # multiple_choice: a field holding a list, or one template per choice
    fewshot: str | list[dict[str, Any]] | None = None  # records (inline, or a file) shown before the question
    num_fewshot: int = 0
    target_delimiter: str = " "  # between prompt and answer
    fewshot_delimiter: str = "\n\n"  # between few-shot examples
    generation: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields; greedy by default
    metrics: list[str] = field(default_factory=list)  # default: the kind's usual metrics
    split: str = "test"  # hub datasets only
    subset: str | None = None  # hub datasets only: the configuration name
    path: Path | None = None  # the YAML file
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    shots: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        where = self.path or self.name
        if self.kind not in KINDS:
            raise TaskError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        allowed, default = METRICS[self.kind]
        self.metrics = list(self.metrics or default)
        for metric in self.metrics:
            if metric not in allowed:
                raise TaskError(f"{where}: metric {metric!r} does not apply to a {self.kind} task; use {', '.join(allowed)}")
        unknown = set(self.generation) - set(GENERATION_KEYS)
        if unknown:
            raise TaskError(f"{where}: generation key {min(unknown)!r} is unknown; use {', '.join(GENERATION_KEYS)}")
        if self.kind == "multiple_choice" and not self.choices:
            raise TaskError(f"{where}: a multiple_choice task needs `choices` (a list field or a list of templates)")
        if self.num_fewshot < 0:
            raise TaskError(f"{where}: num_fewshot must be >= 0, got {self.num_fewshot}")

    # ---- loading ------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: Path | str) -> Task:
        path = Path(path)
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TaskError(f"{path}: cannot read the task file ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise TaskError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(spec, dict):
            raise TaskError(f"{path}: a task file is a mapping of keys (kind, data, prompt, target, ...)")
        keys = [f.name for f in fields(cls) if f.name not in ("path", "records", "shots")]
        for key in spec:
            if key not in keys:
                raise TaskError(f"{path}: unknown key {key!r}; valid keys: {', '.join(keys)}")
        for key in ("kind", "data", "prompt", "target"):
            if key not in spec:
                raise TaskError(f"{path}: the key {key!r} is required")
        task = cls(**{"name": path.stem, **spec, "path": path})
        task.records = task._load(task.data, "data")
        if isinstance(task.fewshot, str):
            task.shots = task._load(task.fewshot, "fewshot")
        elif task.fewshot:
            task.shots = list(task.fewshot)
        if task.num_fewshot > len(task.shots):
            raise TaskError(f"{path}: num_fewshot is {task.num_fewshot} but the task has {len(task.shots)} few-shot examples")
        task._check_templates()
        return task

    def _load(self, source: str, key: str) -> list[dict[str, Any]]:
        if source.startswith("hub:"):
            return _load_hub(source[4:], self.subset, self.split, self.path)
        file = (self.path.parent if self.path else Path()) / source
        records = read_records(file, f"{self.path}: {key}")
        if not records:
            raise TaskError(f"{file}: no records")
        return records

    def _check_templates(self) -> None:
        """Every field a template names exists in every record that template is rendered on."""
        from jinja2 import TemplateSyntaxError, meta

        env = _env()
        templates = {"prompt": self.prompt, "target": self.target}
        if isinstance(self.choices, list):
            templates.update({f"choices[{i}]": t for i, t in enumerate(self.choices)})
        needed: dict[str, set[str]] = {}
        for key, source in templates.items():
            try:
                needed[key] = meta.find_undeclared_variables(env.parse(source))
            except TemplateSyntaxError as e:
                raise TaskError(f"{self.path}: {key} is not a valid template (line {e.lineno}: {e.message})") from None
        if isinstance(self.choices, str):
            needed["choices"] = {self.choices}
        for label, records in (("data", self.records), ("fewshot", self.shots)):
            for i, record in enumerate(records):
                for key, names in needed.items():
                    missing = sorted(names - set(record))
                    if missing:
                        raise TaskError(
                            f"{self.path}: {key} names the field {missing[0]!r}, which record {i + 1} of "
                            f"the {label} lacks (its fields: {', '.join(record) or 'none'})"
                        )
        self.render(self.records[0])  # an unsafe template fails here, before any model is loaded

    # ---- rendering ----------------------------------------------------------------------------------

    def render(self, record: dict[str, Any]) -> Example:
        references = self._references(record)
        if self.kind != "multiple_choice":
            return Example(self._render("prompt", self.prompt, record), references)
        if isinstance(self.choices, str):
            choices = [str(c) for c in record[self.choices]]
        else:
            choices = [self._render(f"choices[{i}]", t, record) for i, t in enumerate(self.choices)]
        target = references[0]
        if target in choices:
            answer = choices.index(target)
        elif target.strip().isdigit() and int(target) < len(choices):
            answer = int(target)
        else:
            raise TaskError(f"{self.path}: the target {target!r} is neither one of the choices {choices} nor an index")
        return Example(self._render("prompt", self.prompt, record), [choices[answer]], choices, answer)

    def _render(self, key: str, template: str, record: dict[str, Any]) -> str:
        """A template rendered on a record; an unsafe or failing template is a TaskError naming the file and key."""
        from jinja2 import TemplateError
        from jinja2.sandbox import SecurityError

        try:
            return _env().from_string(template).render(**record)
        except SecurityError as e:
            raise TaskError(f"{self.path}: {key} is not allowed in a task template ({e})") from None
        except TemplateError as e:
            raise TaskError(f"{self.path}: {key} cannot be rendered ({type(e).__name__}: {e})") from None

    def _references(self, record: dict[str, Any]) -> list[str]:
        from jinja2 import meta

        names = meta.find_undeclared_variables(_env().parse(self.target))
        if len(names) == 1 and isinstance(record[next(iter(names))], list) and self.target.strip("{} ") == next(iter(names)):
            return [str(v) for v in record[next(iter(names))]]
        return [self._render("target", self.target, record)]

    def examples(self, limit: int | None = None) -> list[Example]:
        """The evaluation items, in file order (the first `limit` of them)."""
        return [self.render(r) for r in self.records[:limit]]

    def fewshot_prefix(self, k: int | None = None) -> str:
        """The first k few-shot examples (default num_fewshot), each answered, ready to prepend to a prompt."""
        k = self.num_fewshot if k is None else k
        if k > len(self.shots):
            raise TaskError(f"{self.name}: {k} few-shot examples asked for, the task has {len(self.shots)}")
        shots = [self.render(r) for r in self.shots[:k]]
        return "".join(s.prompt + self.target_delimiter + s.references[0] + self.fewshot_delimiter for s in shots)

    def training_examples(self) -> list[tuple[str, str]]:
        """(prompt, target) pairs for fine-tuning: prompt + target is the whole text, the loss goes on target.

        The target (the first accepted answer; the right option of a multiple-choice item) starts with
        `target_delimiter`, so the pair tokenizes as the evaluation scores it. No few-shot preamble."""
        return [(e.prompt, self.target_delimiter + e.references[0]) for e in self.examples()]

    def config_hash(self, **settings: Any) -> str:
        """A short hash of everything that decides the scores: the task's keys, its data and the run's settings."""
        spec = {k: v for k, v in asdict(self).items() if k not in ("path", "records", "shots")}
        blob = json.dumps([spec, self.records, self.shots, settings], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@lru_cache(maxsize=1)
def _env():
    """Sandboxed, as chat templates are: a task file may come from anyone, and Jinja's plain environment
    lets a template reach Python's internals (`cycler.__init__.__globals__.os`). Not the chat templates'
    environment: its `trim_blocks`/`lstrip_blocks` would change how prompts render."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


def read_records(file: Path, what: str) -> list[dict[str, Any]]:
    """Records from a .jsonl (one object a line), .json (a list of objects) or .csv (a header row) file."""
    if not file.is_file():
        raise TaskError(f"{what}: the data file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if file.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskError(f"{file}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(records[-1], dict):
                    raise TaskError(f"{file}:{number}: a record must be a JSON object")
        return records
    if file.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TaskError(f"{file}: a .json data file must hold a list of objects")
        return records
    raise TaskError(f"{what}: {file} is not a .jsonl, .json or .csv file")


def _load_hub(dataset: str, subset: str | None, split: str, path: Path | None) -> list[dict[str, Any]]:
    """A Hugging Face dataset's split through `datasets`; refused at once when the hub is marked offline."""
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
    if offline:
        raise TaskError(
            f"{path}: the hub dataset {dataset!r} cannot be downloaded: {offline[0]} is set "
            "(use a local .jsonl/.json/.csv file instead)"
        )
    try:
        import datasets
    except ImportError:
        raise TaskError(f"{path}: hub datasets need the `datasets` package (pip install datasets)") from None
    try:
        return [dict(r) for r in datasets.load_dataset(dataset, subset, split=split)]
    except Exception as e:  # network, unknown dataset or split: datasets raises many types
        raise TaskError(f"{path}: cannot load the hub dataset {dataset!r} (split {split!r}): {e}") from None


def builtin_tasks() -> dict[str, Path]:
    """Name -> YAML file of the tasks shipped with LLMasOS."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_task(name_or_path: str | Path) -> Task:
    """A built-in task by name, or a task YAML file; checked completely before it is returned."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise TaskError(f"{path}: no such task file")
        return Task.from_yaml(path)
    builtin = builtin_tasks()
    if str(name_or_path) not in builtin:
        raise TaskError(
            f"unknown task {str(name_or_path)!r}; built-in tasks: {', '.join(builtin)} "
            "(or give the path of a task YAML, or lm_eval:TASK)"
        )
    return Task.from_yaml(builtin[str(name_or_path)])
