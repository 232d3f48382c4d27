"""lm-evaluation-harness adapter: the `llmasos` model for lm-eval, and a launcher for its CLI.

lm-eval 0.4 finds models only in its own registry (it reads no entry points), so the class is
registered when this module is imported. From Python:

    import lm_eval, llmasos.evaluation.harness
    lm_eval.simple_evaluate(model="llmasos", model_args="pretrained=PATH", tasks=[...])

From the shell, this module is lm-eval's CLI with the model registered (same arguments):

    python -m llmasos.evaluation.harness run --model llmasos --model_args pretrained=PATH --tasks hellaswag

and `llmasos eval MODEL --tasks lm_eval:TASK [--include-path DIR]` runs lm-eval tasks in-process.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch

from llmasos.errors import LLMasOSError
from llmasos.evaluation.results import EvalConfig, Result
from llmasos.evaluation.scoring import loglikelihoods
from llmasos.inference import LLM, SamplingParams

try:
    import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry skips them once non-empty
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LLMasOSError("lm-eval tasks need the lm-eval package: pip install 'llmasos[eval]'") from None


@register_model("llmasos")
class LLMasOSLM(TemplateLM):
    """An LLMasOS model in lm-eval: log-likelihoods by batched forward passes, generation on the engine.

    model_args: pretrained (a store name or model dir), dtype, device, batch_size, max_length, kernels
    (as `LLM.load`); or pass an already loaded `LLM` as llm=."""

    def __init__(
        self,
        pretrained: str | None = None,
        llm=None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        kernels: bool = True,
        **_ignored: Any,
    ):
        super().__init__()
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        if llm is None:
            if pretrained is None:
                raise LLMasOSError("the llmasos lm-eval model needs pretrained=MODEL (a store name or model dir)")
            llm = LLM.load(pretrained, dtype=dtype, device=device, max_batch_size=_batch_size(batch_size), kernels=kernels)
        self.llm, self.name = llm, str(pretrained or llm.path)
        self.tokenizer = llm.tokenizer
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length or llm.config.max_position_embeddings)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """An empty context is conditioned on BOS (EOS when the tokenizer has none), as lm-eval's HF model does."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = loglikelihoods(
            self.llm.model,
            [(ctx, cont) for _, ctx, cont in requests],
            batch_size=self._batch_size,
            max_length=self.max_length,
            progress=not disable_tqdm,
        )
        for (pair, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods over disjoint windows of max_length (lm-eval's rolling recipe)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        scores = loglikelihoods(
            self.llm.model, windows, batch_size=self._batch_size, max_length=self.max_length, progress=not disable_tqdm
        )
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when asked) continuations, all requests batched through the engine."""
        from lm_eval.models.utils import normalize_gen_kwargs

        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
            max_tokens = min(int(kwargs["max_gen_toks"]), self.max_length - 1)
            until = kwargs.get("until") or []
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=float(kwargs.get("temperature", 0.0)),
                    top_p=float(kwargs.get("top_p") or 1.0),
                    stop=[until] if isinstance(until, str) else list(until),
                )
            )
            prompts.append(self.tok_encode(context)[-(self.max_length - max_tokens) :])  # oldest tokens go first
        engine = self.llm.engine
        outputs = [engine.add(p, sp) for p, sp in zip(prompts, params)]
        texts = [o.text for o in engine.run(outputs, progress=not disable_tqdm)]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def get_model_info(self) -> dict[str, Any]:
        return {"model": self.name, "max_length": self.max_length}


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes "auto", None or a string; our batches are a fixed size."""
    if value in (None, "auto") or (isinstance(value, str) and value.startswith("auto")):
        return 16
    return max(1, int(value))


def task_manager(names: list[str], include_path: str | None = None):
    """A TaskManager that knows `names`: indexing lm-eval's thousands of built-in tasks takes many seconds,
    so it is skipped when the include path has them all."""
    from lm_eval.tasks import TaskManager

    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            return manager
    return TaskManager(include_path=include_path)


def check_tasks(names: list[str], include_path: str | None = None):
    """The TaskManager for `names`, or an error naming the first unknown one."""
    manager = task_manager(names, include_path)
    for name in names:
        if name not in manager.all_tasks:
            where = (
                f" (searched lm-eval's tasks and {include_path})"
                if include_path
                else " (a local task YAML needs --include-path DIR)"
            )
            raise LLMasOSError(f"unknown lm-eval task {name!r}{where}")
    return manager


def run_lm_eval(llm: LLM, names: list[str], manager, config: EvalConfig, model_name: str) -> list[Result]:
    """lm-eval tasks on an already loaded LLM, as `Result` rows (metric "acc", "exact_match", ...)."""
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=LLMasOSLM(llm=llm, batch_size=config.batch_size),
        tasks=names,
        task_manager=manager,
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        log_samples=False,
    )
    seconds = time.perf_counter() - t0
    rows = []
    for task, values in out["results"].items():
        samples = out.get("n-samples", {}).get(task, {}).get("effective", 0)
        settings = [out.get("configs", {}).get(task), config.limit, config.num_fewshot]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        for key, value in values.items():
            metric, _, filt = key.partition(",")  # lm-eval names scores "metric,filter"
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append(
                Result(
                    model_name,
                    f"lm_eval:{task}",
                    metric if filt == "none" else f"{metric},{filt}",
                    float(value),
                    float(stderr) if isinstance(stderr, (int, float)) else None,
                    int(samples),
                    digest,
                    seconds,
                )
            )
    return rows


def main() -> None:
    """lm-eval's own command line, with the `llmasos` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
