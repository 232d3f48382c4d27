import json

import pytest

from llmasos.evaluation import builtin_tasks
from llmasos.evaluation.results import EvalConfig, Result, compare_table, read_results, write_results
from llmasos.evaluation.runner import evaluate


def test_every_builtin_task_runs_on_a_tiny_model(llm):
    names = list(builtin_tasks())
    rows = evaluate(llm, EvalConfig(tasks=names, limit=2, batch_size=4), "tiny", progress=False)
    assert {r.task for r in rows} == set(names)
    for r in rows:
        assert r.samples == 2 and r.value == r.value and r.seconds > 0 and len(r.config_hash) == 12
        if r.metric in ("acc", "acc_norm", "exact_match", "f1"):
            assert 0 <= r.value <= 1 and r.stderr is not None
        if r.metric in ("bleu", "chrf", "perplexity"):
            assert r.stderr is None
    assert next(r for r in rows if r.metric == "perplexity").value > 1


def test_generation_is_greedy_through_the_engine_and_scored_against_references(llm, tmp_path):
    """An exact-match task whose references are the model's own greedy outputs scores 1."""
    from llmasos import SamplingParams

    prompts = ["The quick brown fox", "Once upon a time"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"p": p, "a": o.text.strip()}) + "\n" for p, o in zip(prompts, outs)))
    (tmp_path / "t.yaml").write_text(
        'kind: qa\ndata: d.jsonl\nprompt: "{{ p }}"\ntarget: "{{ a }}"\ngeneration: {max_tokens: 4}\nmetrics: [exact_match]\n'
    )
    [row] = evaluate(llm, EvalConfig(tasks=[str(tmp_path / "t.yaml")]), "tiny", progress=False)
    assert row.value == 1.0 and row.stderr == 0.0


def test_a_prompt_beyond_the_context_names_the_task(llm, tmp_path):
    from llmasos.errors import LLMasOSError

    (tmp_path / "d.jsonl").write_text(json.dumps({"p": "word " * 600, "a": "x"}) + "\n")
    (tmp_path / "long.yaml").write_text('kind: qa\ndata: d.jsonl\nprompt: "{{ p }}"\ntarget: "{{ a }}"\n')
    with pytest.raises(LLMasOSError, match="long: example 1 has a prompt of .* exceeds the model's context of 512"):
        evaluate(llm, EvalConfig(tasks=[str(tmp_path / "long.yaml")]), "tiny", progress=False)


def test_results_round_trip_and_compare_side_by_side(tmp_path):
    from rich.console import Console

    a = [Result("base", "qa", "f1", 0.25, 0.1, 10, "abc", 1.0), Result("base", "mc", "acc", 0.5, 0.1, 10, "def", 1.0)]
    b = [Result("tuned", "qa", "f1", 0.75, 0.1, 10, "abc", 1.0), Result("tuned", "mc", "acc", 0.6, 0.1, 10, "xyz", 1.0)]
    write_results(a, tmp_path / "a.json", "base")
    write_results(b, tmp_path / "b.json", "tuned")
    assert read_results(tmp_path / "a.json") == a
    console = Console(record=True, width=120)
    console.print(compare_table([tmp_path / "a.json", tmp_path / "b.json"]))
    text = console.export_text()
    assert "base" in text and "tuned" in text
    assert "0.2500" in text and "0.7500" in text
    assert "0.5000 †" in text and "0.6000 †" in text  # different task configs are marked
