import json
import os
import subprocess
import sys

import pytest

from llmasos.evaluation import builtin_tasks

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LLMASOS_KERNELS": "0"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmasos", *args], capture_output=True, text=True, env=ENV, cwd=cwd)


def test_tasks_lists_every_builtin_task():
    r = run("tasks")
    assert r.returncode == 0, r.stderr
    for name in builtin_tasks():
        assert name in r.stdout
    assert "multiple_choice" in r.stdout and "exact_match" in r.stdout


def test_eval_writes_results_and_compare_sets_runs_side_by_side(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time, in a land far away, there lived a small language model. " * 8)
    out = tmp_path / "a.json"
    r = run(
        "eval",
        str(tiny[0]),
        "--tasks",
        "science_mc,arithmetic_qa",
        "--limit",
        "2",
        "--batch-size",
        "4",
        "--perplexity",
        str(text),
        "--stride",
        "64",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "science_mc" in r.stdout and "perplexity:text.txt" in r.stdout and f"wrote {out}" in r.stdout
    results = json.loads(out.read_text())
    assert results["model"] == str(tiny[0])
    assert {(x["task"], x["metric"]) for x in results["results"]} == {
        ("science_mc", "acc"),
        ("science_mc", "acc_norm"),
        ("arithmetic_qa", "exact_match"),
        ("arithmetic_qa", "f1"),
        ("perplexity:text.txt", "perplexity"),
    }
    for row in results["results"]:
        assert set(row) == {"model", "task", "metric", "value", "stderr", "samples", "config_hash", "seconds"}
    other = {"model": "other", "results": [{**x, "model": "other", "value": 0.125} for x in results["results"]]}
    (tmp_path / "b.json").write_text(json.dumps(other))
    r = run("eval", "compare", str(out), str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    assert "other" in r.stdout and "0.1250" in r.stdout and "acc_norm" in r.stdout


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "files, task, message",
    [
        ({}, "no_such_task", "error: unknown task 'no_such_task'; built-in tasks: arithmetic_qa"),
        (
            {"t.yaml": 'kind: qa\ndata: gone.jsonl\nprompt: "{{ q }}"\ntarget: "{{ a }}"\n'},
            "t.yaml",
            "error: .*t.yaml: data: the data file .*gone.jsonl does not exist",
        ),
        (
            {
                "t.yaml": 'kind: qa\ndata: d.jsonl\nprompt: "{{ question }}"\ntarget: "{{ a }}"\n',
                "d.jsonl": '{"q": "x", "a": "y"}\n',
            },
            "t.yaml",
            "error: .*t.yaml: prompt names the field 'question', which record 1 of the data lacks",
        ),
    ],
)
def test_bad_tasks_are_named_before_the_model_is_loaded(tmp_path, files, task, message):
    """The model path does not exist: the task's error comes first, so no model work was done."""
    import re

    for name, text in files.items():
        write(tmp_path, name, text)
    r = run("eval", str(tmp_path / "no-such-model"), "--tasks", str(tmp_path / task) if files else task)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr


def test_compare_needs_two_results_files(tmp_path):
    r = run("eval", "compare", write(tmp_path, "a.json", '{"model": "m", "results": []}'))
    assert r.returncode == 1 and "compare needs at least two results files" in r.stderr
