"""The lm-eval adapter, driven through lm-eval's own Python API on local tasks (offline)."""

import pytest
from helpers import MC_RECORDS, write_jsonl

from llmasos.evaluation.scoring import encode_pair, loglikelihoods

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def harness():
    from llmasos.evaluation import harness

    return harness


def instance(request_type, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=idx)


@pytest.fixture
def local_tasks(tmp_path, monkeypatch):
    """lm-eval task YAMLs over local JSONL: a multiple-choice task and a generation task."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"q": "Once upon a", "a": "time"}, {"q": "The quick brown", "a": "fox"}])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    (tasks / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""")
    return tasks, tmp_path


def test_adapter_loglikelihoods_equal_our_scoring(llm, harness):
    lm = harness.LLMasOSLM(llm=llm, batch_size=2)
    pairs = [("The quick brown", " fox"), ("Once upon a time ", "in a land"), ("def f(x):", "\n    return x")]
    theirs = lm.loglikelihood([instance("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    ours = loglikelihoods(llm.model, [encode_pair(llm.tokenizer, c, k) for c, k in pairs])
    assert [v for v, _ in theirs] == pytest.approx([v for v, _ in ours], abs=1e-4)
    assert [g for _, g in theirs] == [g for _, g in ours]


def test_rolling_loglikelihood_conditions_on_bos_only(llm, harness):
    lm = harness.LLMasOSLM(llm=llm, max_length=16)
    text = "Once upon a time, in a land far away, there lived a small language model."
    tokens = llm.tokenizer.encode(text, add_special_tokens=False)
    assert len(tokens) > 16  # more than one window
    [rolling] = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
    # disjoint windows predicting 16 tokens each, with the rest of a 16-token window as context (BOS first)
    full = [llm.tokenizer.bos_id] + tokens
    windows = [(full[max(0, s + len(tokens[s : s + 16]) - 16) : s + 1], tokens[s : s + 16]) for s in range(0, len(tokens), 16)]
    expected = sum(v for v, _ in loglikelihoods(llm.model, windows, max_length=16))
    assert rolling == pytest.approx(expected, rel=1e-5)


def test_simple_evaluate_by_registered_name_on_local_tasks(llm, tiny, harness, local_tasks):
    from lm_eval.tasks import TaskManager

    from llmasos.evaluation.results import EvalConfig
    from llmasos.evaluation.runner import run_task
    from llmasos.evaluation.tasks import load_task

    tasks_dir, tmp = local_tasks
    out = lm_eval.simple_evaluate(
        model="llmasos",
        model_args=f"pretrained={tiny[0]},dtype=float32,kernels=False",
        tasks=["tiny_mc", "tiny_gen"],
        batch_size=4,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
    )
    assert 0.0 <= out["results"]["tiny_gen"]["exact_match,none"] <= 1.0
    # the same questions as an LLMasOS task give the same accuracy
    (tmp / "ours.yaml").write_text(
        'kind: multiple_choice\ndata: mc.jsonl\nprompt: "{{ question }}\\nAnswer:"\nchoices: choices\ntarget: "{{ answer }}"\n'
    )
    ours = run_task(llm, load_task(tmp / "ours.yaml"), EvalConfig(tasks=["x"]), "tiny", progress=False)
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(ours[0].value)


def test_llmasos_eval_runs_lm_eval_tasks_in_process(llm, local_tasks):
    from llmasos.evaluation.results import EvalConfig
    from llmasos.evaluation.runner import evaluate

    tasks_dir, _ = local_tasks
    config = EvalConfig(tasks=["lm_eval:tiny_mc"], include_path=str(tasks_dir), limit=3)
    [row] = evaluate(llm, config, "tiny", progress=False)
    assert (row.task, row.metric, row.samples) == ("lm_eval:tiny_mc", "acc", 3) and row.stderr is not None
