"""Evaluation: YAML tasks with library metrics, sliding-window perplexity, the lm-eval adapter.

Tasks (`llmasos.evaluation.tasks`) also drive fine-tuning::

    from llmasos.evaluation.tasks import load_task     # also exported by llmasos.evaluation
    task = load_task("capitals_qa")          # a built-in name, or the path of a task YAML
    pairs = task.training_examples()         # [(prompt, target), ...]: prompt rendered through the
                                             # task's template; target starts with the task's
                                             # target_delimiter, so prompt + target is the full text
                                             # and the loss belongs on target

`load_task` checks everything (keys, data files, template fields) and raises `TaskError` (an
`LLMasOSError`) naming the problem. `task.examples(limit)` gives the rendered evaluation items,
`task.fewshot_prefix(k)` the few-shot preamble.

Running (`llmasos.evaluation.runner`): `evaluate(llm, EvalConfig(tasks=[...]), model_name)` returns
one `Result` per task and metric; `EvalConfig`, `Result`, the results file and the tables live in
`llmasos.evaluation.results`. `sliding_perplexity(model, ids, max_length, stride)` in
`llmasos.evaluation.scoring` is transformers' sliding-window recipe. `llmasos.evaluation.harness`
(needs lm-eval) registers the `llmasos` model with lm-eval.

Inside the package, imports run one way: `runner` uses `harness` (loaded only for an lm_eval: task,
since it needs lm-eval) and the modules below; `harness` uses `results` and `scoring`; `results`,
`scoring`, `metrics` and `tasks` use none of the others.
"""

from llmasos.evaluation.tasks import Task, TaskError, builtin_tasks, load_task

__all__ = ["Task", "TaskError", "builtin_tasks", "load_task"]
