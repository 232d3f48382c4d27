"""Running tasks on a model: batched generation through the engine, log-likelihoods by batched
forward passes, one `Result` row per task and metric (`llmasos.evaluation.results` holds the rows,
the config, the results file and the tables)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmasos.errors import LLMasOSError
from llmasos.evaluation import metrics
from llmasos.evaluation.results import EvalConfig, Result
from llmasos.evaluation.scoring import encode_pair, loglikelihoods, perplexity_tokens, sliding_perplexity
from llmasos.evaluation.tasks import Task, TaskError, load_task
from llmasos.inference import SamplingParams

LM_EVAL_PREFIX = "lm_eval:"


@dataclass
class Plan:
    """The checked work of one run, ready before the model is loaded."""

    tasks: list[Task]
    lm_eval_tasks: list[str]
    lm_eval_manager: object | None = None  # lm-eval's TaskManager that knows lm_eval_tasks


def plan(config: EvalConfig) -> Plan:
    """Load and check every task (and the perplexity source's existence) before any model work."""
    ours = [load_task(t) for t in config.tasks if not t.startswith(LM_EVAL_PREFIX)]
    theirs = [t[len(LM_EVAL_PREFIX) :] for t in config.tasks if t.startswith(LM_EVAL_PREFIX)]
    if config.num_fewshot is not None:
        for task in ours:
            task.fewshot_prefix(config.num_fewshot)  # refuses more shots than the task has
    manager = None
    if theirs:
        from llmasos.evaluation.harness import check_tasks  # needs lm-eval, an optional package

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
        from llmasos.evaluation.harness import run_lm_eval  # needs lm-eval, an optional package

        rows += run_lm_eval(llm, work.lm_eval_tasks, work.lm_eval_manager, config, model_name)
    if config.perplexity:
        rows.append(run_perplexity(llm, config, model_name, progress))
    return rows


def run_task(llm, task: Task, config: EvalConfig, model_name: str, progress: bool = True) -> list[Result]:
    t0 = time.perf_counter()
    shots = task.num_fewshot if config.num_fewshot is None else config.num_fewshot
    prefix = task.fewshot_prefix(shots)
    examples = task.examples(config.limit)
    score = {"batch_size": config.batch_size, "progress": progress}
    scores: dict[str, metrics.Score]
    if task.kind == "multiple_choice":
        pairs = [encode_pair(llm.tokenizer, prefix + e.prompt, task.target_delimiter + c) for e in examples for c in e.choices]
        lls = iter(loglikelihoods(llm.model, pairs, **score))
        acc, acc_norm = [], []
        for e in examples:
            ll = [next(lls)[0] for _ in e.choices]
            normed = [v / max(1, len(c)) for v, c in zip(ll, e.choices)]  # per character, as lm-eval's acc_norm
            acc.append(float(max(range(len(ll)), key=ll.__getitem__) == e.answer))
            acc_norm.append(float(max(range(len(ll)), key=normed.__getitem__) == e.answer))
        scores = {"acc": metrics.mean(acc), "acc_norm": metrics.mean(acc_norm)}
    else:
        params = SamplingParams(**{"max_tokens": 32, "temperature": 0.0, **task.generation})
        prompts = [llm.tokenizer.encode(prefix + e.prompt) for e in examples]
        context = llm.engine.max_seq_len
        for i, ids in enumerate(prompts):
            if len(ids) + (params.max_tokens or 1) > context:
                raise TaskError(
                    f"{task.name}: example {i + 1} has a prompt of {len(ids)} tokens; with max_tokens "
                    f"{params.max_tokens} it exceeds the model's context of {context} tokens (use fewer "
                    "few-shot examples: --num-fewshot)"
                )
        outputs = llm.generate(prompts, params, progress=progress)
        predictions = [o.text.strip() for o in outputs]
        references = [e.references for e in examples]
        scores = metrics.generative_scores(task.metrics, predictions, references)
        if "perplexity" in task.metrics:
            pairs = [encode_pair(llm.tokenizer, prefix + e.prompt, task.target_delimiter + e.references[0]) for e in examples]
            lls = loglikelihoods(llm.model, pairs, **score)
            scores["perplexity"] = metrics.perplexity([v for v, _ in lls], [len(c) for _, c in pairs])
    seconds = time.perf_counter() - t0
    digest = task.config_hash(limit=config.limit, num_fewshot=shots)
    return [
        Result(model_name, task.name, m, scores[m].value, scores[m].stderr, len(examples), digest, seconds) for m in task.metrics
    ]


def run_perplexity(llm, config: EvalConfig, model_name: str, progress: bool = True) -> Result:
    t0 = time.perf_counter()
    ids = perplexity_tokens(config.perplexity, llm.tokenizer, llm.config.vocab_size)
    window = llm.config.max_position_embeddings
    result = sliding_perplexity(
        llm.model, ids, max_length=window, stride=config.stride, batch_size=config.batch_size, progress=progress
    )
    digest = hashlib.sha256(json.dumps([window, config.stride]).encode() + np.asarray(ids, np.int64).tobytes())
    digest = digest.hexdigest()[:12]
    return Result(
        model_name,
        f"perplexity:{Path(config.perplexity).name}",
        "perplexity",
        result.perplexity,
        None,
        result.tokens,
        digest,
        time.perf_counter() - t0,
    )
