import pytest
from helpers import MC_RECORDS, write_jsonl

from llmasos.evaluation import TaskError, builtin_tasks, load_task


def write_task(tmp_path, body: str, name: str = "task.yaml"):
    path = tmp_path / name
    path.write_text(body)
    return path


QA = """kind: qa
data: qa.jsonl
prompt: "Q: {{ question }}\\nA:"
target: "{{ answers }}"
fewshot: [{question: "1+1?", answers: ["2"]}]
num_fewshot: 1
"""


def test_builtin_tasks_cover_every_kind_and_load():
    tasks = {name: load_task(name) for name in builtin_tasks()}
    assert {t.kind for t in tasks.values()} == {"generation", "translation", "qa", "multiple_choice"}
    for task in tasks.values():
        assert len(task.records) >= 20 and task.description and task.metrics


def test_a_task_renders_prompts_fewshot_and_every_accepted_answer(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "Capital of the US?", "answers": ["Washington", "D.C."]}])
    task = load_task(write_task(tmp_path, QA))
    assert task.name == "task" and task.metrics == ["exact_match", "f1"]  # the kind's defaults
    [example] = task.examples()
    assert example.prompt == "Q: Capital of the US?\nA:" and example.references == ["Washington", "D.C."]
    assert task.fewshot_prefix() == "Q: 1+1?\nA: 2\n\n"


def test_training_examples_are_prompt_and_delimited_target(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answers": ["4"]}, {"question": "3+3?", "answers": ["6"]}])
    assert load_task(write_task(tmp_path, QA)).training_examples() == [("Q: 2+2?\nA:", " 4"), ("Q: 3+3?\nA:", " 6")]
    mc = load_task("science_mc").training_examples()[0]
    assert mc == ("Question: Which planet is closest to the Sun?\nAnswer:", " Mercury")


def test_csv_and_json_data_files(tmp_path):
    (tmp_path / "d.csv").write_text("en,fr\nHello,Bonjour\nCat,Chat\n")
    body = 'kind: translation\ndata: d.csv\nprompt: "{{ en }} ="\ntarget: "{{ fr }}"\n'
    assert [e.references for e in load_task(write_task(tmp_path, body)).examples()] == [["Bonjour"], ["Chat"]]
    (tmp_path / "d.json").write_text('[{"en": "Dog", "fr": "Chien"}]')
    assert load_task(write_task(tmp_path, body.replace("d.csv", "d.json"))).examples()[0].references == ["Chien"]


def test_multiple_choice_target_may_be_an_index_or_the_choice_text(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS[:1] + [{"question": "q", "choices": ["x", "y"], "answer": "y"}])
    body = 'kind: multiple_choice\ndata: mc.jsonl\nprompt: "{{ question }}"\nchoices: choices\ntarget: "{{ answer }}"\n'
    first, second = load_task(write_task(tmp_path, body)).examples()
    assert (first.answer, first.references) == (1, [" B"]) and (second.answer, second.choices) == (1, ["x", "y"])


def test_unknown_task_names_it_and_lists_the_builtins():
    with pytest.raises(TaskError, match="unknown task 'no_such_task'; built-in tasks: .*science_mc"):
        load_task("no_such_task")


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(TaskError, match="the data file .*qa.jsonl does not exist"):
        load_task(write_task(tmp_path, QA))


def test_a_template_field_the_data_lacks_is_named(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answers": ["a"]}, {"query": "q2", "answers": ["b"]}])
    with pytest.raises(
        TaskError,
        match="prompt names the field 'question', which record 2 of the data lacks "
        r"\(its fields: query, answers\)",
    ):
        load_task(write_task(tmp_path, QA))


@pytest.mark.parametrize(
    "body, message",
    [
        ("kind: qa\ndata: x.jsonl\nprompt: p\ntarget: t\ncolour: red\n", "unknown key 'colour'; valid keys: kind, data"),
        ("kind: essay\ndata: x.jsonl\nprompt: p\ntarget: t\n", "kind 'essay' is not one of generation"),
        ("kind: qa\ndata: x.jsonl\nprompt: p\ntarget: t\nmetrics: [acc]\n", "metric 'acc' does not apply to a qa task"),
        ("kind: qa\ndata: x.jsonl\nprompt: p\n", "the key 'target' is required"),
        ("kind: qa\ndata: x.jsonl\nprompt: p\ntarget: t\ngeneration: {beams: 4}\n", "generation key 'beams' is unknown"),
    ],
)
def test_bad_task_keys_are_named(tmp_path, body, message):
    with pytest.raises(TaskError, match=message):
        load_task(write_task(tmp_path, body))


def test_more_fewshot_examples_than_the_task_has_are_refused(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answers": ["a"]}])
    with pytest.raises(TaskError, match="2 few-shot examples asked for, the task has 1"):
        load_task(write_task(tmp_path, QA)).fewshot_prefix(2)


def test_a_hub_dataset_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    body = 'kind: qa\ndata: "hub:rajpurkar/squad"\nsplit: validation\nprompt: "{{ question }}"\ntarget: "{{ answers }}"\n'
    with pytest.raises(TaskError, match="hub dataset 'rajpurkar/squad' cannot be downloaded: HF_HUB_OFFLINE is set"):
        load_task(write_task(tmp_path, body))


@pytest.mark.parametrize("key", ["prompt", "target"])
def test_a_template_reaching_for_python_internals_is_refused_and_runs_nothing(tmp_path, key):
    """The report: this prompt ran a shell command during `llmasos eval`; task templates render sandboxed."""
    marker = tmp_path / "pwned"
    write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1?", "a": "2"}])
    templates = {
        "prompt": "{{ q }}",
        "target": "{{ a }}",
        key: f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}",
    }
    body = f'kind: qa\ndata: d.jsonl\nprompt: "{templates["prompt"]}"\ntarget: "{templates["target"]}"\n'
    with pytest.raises(TaskError, match=rf"task.yaml: {key} is not allowed in a task template \(.*unsafe"):
        load_task(write_task(tmp_path, body))
    assert not marker.exists()


def test_the_reported_payload_is_refused_when_the_task_loads(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1?", "a": "2"}])
    body = "kind: qa\ndata: d.jsonl\nprompt: \"{{ cycler.__init__.__globals__.os.popen('id').read() }}\"\ntarget: a\n"
    with pytest.raises(TaskError, match="task.yaml: prompt is not allowed in a task template"):
        load_task(write_task(tmp_path, body))


def test_a_template_that_fails_on_a_record_is_named(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1?", "a": "2"}])
    body = 'kind: qa\ndata: d.jsonl\nprompt: "{{ q.missing }}"\ntarget: "{{ a }}"\n'
    with pytest.raises(TaskError, match="task.yaml: prompt cannot be rendered \\(UndefinedError"):
        load_task(write_task(tmp_path, body))
