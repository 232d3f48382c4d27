"""LoRA adapters served live: each a model id of its own (`--lora` at start, vLLM's load/unload routes while
serving), picked by a request's `model`, answering what its merged model answers, with bad dirs refused and the
server serving on."""

import threading
import time

import httpx
import pytest
from helpers import API_KEY, StepGate, live_server, write_lora_adapter

from llmasos.models.lora import LINEAR_NAMES

PROMPTS = ["Once upon a time", "def fibonacci(n):", "The quick brown fox"]
GREEDY = {"max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served_adapters")
    return {
        "qv": write_lora_adapter(tiny_dir, root / "qv", ("q_proj", "v_proj"), rank=4, alpha=8, seed=1),
        "all": write_lora_adapter(tiny_dir, root / "all", tuple(LINEAR_NAMES), rank=8, alpha=4, seed=2),
        "mlp": write_lora_adapter(tiny_dir, root / "mlp", ("up_proj", "down_proj"), rank=2, alpha=4, seed=3),
    }


@pytest.fixture(scope="module")
def merged(tiny_dir, adapter_dirs):
    """What each merged model (and the base) says for PROMPTS, greedy: the texts the served adapters must give."""
    from llmasos import LLM, SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    sources = {"tiny": tiny_dir, **adapter_dirs}
    return {name: [o.text for o in LLM.load(path).generate(PROMPTS, params)] for name, path in sources.items()}


@pytest.fixture(scope="module")
def served(tiny_dir, adapter_dirs):
    """A server of its own for the tiny model with `qv` loaded at start, as `llmasos serve tiny --lora qv=DIR
    --allow-runtime-lora` does."""
    from llmasos import LLM

    llm = LLM.load(tiny_dir, max_batch_size=16)
    llm.load_adapter("qv", adapter_dirs["qv"])
    with live_server(llm, served_model_name="tiny", api_key=API_KEY, allow_runtime_lora=True) as url:
        yield url, llm


@pytest.fixture
def client(served):
    import openai

    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def http(served):
    import httpx

    with httpx.Client(base_url=served[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def complete(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, **{**GREEDY, **kw}).choices[0].text


def load(http, name, path):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(http, name):
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_an_adapter_loaded_at_start_is_a_model_of_its_own(client, adapter_dirs, merged):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["tiny", "qv"]
    assert cards["qv"].model_extra["parent"] == "tiny" and cards["qv"].model_extra["root"] == str(adapter_dirs["qv"])
    assert cards["tiny"].model_extra["parent"] is None
    out = client.completions.create(model="qv", prompt=PROMPTS[0], **GREEDY)
    assert out.model == "qv" and out.choices[0].text == merged["qv"][0]
    chat = client.chat.completions.create(model="qv", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.model == "qv"
    assert complete(client, "tiny", PROMPTS[0]) == merged["tiny"][0]


def test_loaded_and_unloaded_while_serving(client, http, served, adapter_dirs, merged):
    r = load(http, "all", adapter_dirs["all"])
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'all' added successfully."
    assert [m.id for m in client.models.list().data] == ["tiny", "all", "qv"]
    assert [complete(client, "all", p) for p in PROMPTS] == merged["all"]
    r = unload(http, "all")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'all' removed successfully."
    assert [m.id for m in client.models.list().data] == ["tiny", "qv"]
    r = http.post("/v1/completions", json={"model": "all", "prompt": "hi"})
    assert r.status_code == 404 and "serves `tiny`, `qv`" in r.json()["error"]["message"]
    assert unload(http, "all").status_code == 404
    assert complete(client, "qv", PROMPTS[1]) == merged["qv"][1]


def test_requests_for_different_adapters_share_batches_and_each_equals_its_merged_model(
    client, http, served, adapter_dirs, merged
):
    from llmasos.models.multi_lora import AdapterSet

    llm = served[1]
    assert load(http, "mlp", adapter_dirs["mlp"]).status_code == 200
    adapters = AdapterSet.of(llm.model)
    seen, select = [], adapters.select
    adapters.select = lambda rows: (seen.append({a.name if a else None for a in rows}), select(rows))[1]
    gate = StepGate(llm.engine)
    gate.hold_after(0)  # every request queues before the engine steps again: they are admitted together
    jobs = [(model, i) for i in range(len(PROMPTS)) for model in ("tiny", "qv", "mlp")]
    results = {}

    def run(model, i):
        results[model, i] = complete(client, model, PROMPTS[i])

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while llm.engine.num_waiting < len(jobs):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.release()
        for t in threads:
            t.join(60)
    finally:
        gate.remove()
        del adapters.select
    assert results == {(model, i): merged[model][i] for model, i in jobs}
    assert {None, "qv", "mlp"} in seen
    assert unload(http, "mlp").status_code == 200


def test_unloading_waits_for_the_requests_using_the_adapter(client, http, served, adapter_dirs, merged):
    from llmasos.models.multi_lora import AdapterSet

    llm = served[1]
    assert load(http, "all", adapter_dirs["all"]).status_code == 200
    gate = StepGate(llm.engine)
    gate.hold_after(1)  # the step that admits the request and gives its first token, then none
    stream = client.completions.create(model="all", prompt=PROMPTS[2], stream=True, **GREEDY)
    try:
        first = next(iter(stream))  # the request is running, and stays so
        answer = {}
        unloading = threading.Thread(target=lambda: answer.setdefault("r", unload(http, "all")))
        unloading.start()
        time.sleep(0.5)
        assert unloading.is_alive()  # the request still uses it
        assert "all" not in [m.id for m in client.models.list().data]  # but no new one may
        assert http.post("/v1/completions", json={"model": "all", "prompt": "hi"}).status_code == 404
        gate.release()
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
        unloading.join(30)
    finally:
        gate.remove()
    assert text == merged["all"][2] and answer["r"].status_code == 200
    assert [a.name for a in AdapterSet.of(llm.model).stacked] == ["qv"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing config", "adapter_config.json: no such file"),
        ("missing weights", "adapter_model.safetensors: no such file"),
        ("unknown target module", "adapter_config.json: unknown target module 'c_attn'"),
        ("wrong base shape", "adapter_model.safetensors: model.layers.0.self_attn.q_proj has lora_A [4, 32]"),
        ("no dir", "no such directory"),
    ],
)
def test_a_bad_adapter_dir_is_a_400_naming_the_file_and_the_server_serves_on(
    client, http, tmp_path, tiny_dir, merged, case, message
):
    import json

    from helpers import make_hf_model

    path = tmp_path / "adapter"
    if case == "wrong base shape":  # an adapter for a narrower model
        other, _ = make_hf_model(tmp_path / "other", hidden_size=32, num_attention_heads=2, num_key_value_heads=2)
        write_lora_adapter(other, path, rank=4)
    elif case != "no dir":
        write_lora_adapter(tiny_dir, path, rank=4)
    if case == "missing config":
        (path / "adapter_config.json").unlink()
    elif case == "missing weights":
        (path / "adapter_model.safetensors").unlink()
    elif case == "unknown target module":
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "c_attn"]}))
    r = load(http, "bad", path)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert message in r.json()["error"]["message"]
    assert "bad" not in [m.id for m in client.models.list().data]
    assert complete(client, "qv", PROMPTS[0]) == merged["qv"][0]


def test_a_name_already_served_is_refused(http, adapter_dirs):
    for name in ("tiny", "qv"):
        r = load(http, name, adapter_dirs["all"])
        assert r.status_code == 400 and "has already been loaded" in r.json()["error"]["message"]
    assert load(http, " ", adapter_dirs["all"]).status_code == 400


def test_an_adapter_embeds_as_its_merged_model(client, adapter_dirs):
    import torch

    from llmasos import LLM

    got = torch.tensor([d.embedding for d in client.embeddings.create(model="qv", input=PROMPTS).data])
    assert (got - LLM.load(adapter_dirs["qv"]).embed(PROMPTS)).abs().max() < 1e-5


def test_serve_takes_lora_name_equals_path():
    from llmasos.cli import build_parser

    args = build_parser().parse_args(["serve", "tiny", "--lora", "sql=runs/sql/adapter", "--lora", "runs/chat/adapter/"])
    assert args.lora == [("sql", "runs/sql/adapter"), ("adapter", "runs/chat/adapter/")]


def test_runtime_loading_is_refused_by_default_and_adapters_given_at_start_still_serve(
    tiny_dir, adapter_dirs, merged, monkeypatch
):
    """Without --allow-runtime-lora (or its environment variable) both routes are a 403 naming the flag, whatever
    the body, and read nothing; the adapters loaded at start-up answer as before."""
    from llmasos import LLM

    monkeypatch.delenv("LLMASOS_ALLOW_RUNTIME_LORA", raising=False)
    llm = LLM.load(tiny_dir, max_batch_size=4)
    llm.load_adapter("qv", adapter_dirs["qv"])
    with live_server(llm, served_model_name="tiny") as url, httpx.Client(base_url=url, timeout=60) as http:
        for r in (
            load(http, "all", adapter_dirs["all"]),
            unload(http, "qv"),
            http.post("/v1/load_lora_adapter", json={"lora_name": 5}),  # refused before the body is read
        ):
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["type"] == "permission_denied" and error["code"] == "allow_runtime_lora_required"
            assert "--allow-runtime-lora" in error["message"] and "LLMASOS_ALLOW_RUNTIME_LORA=1" in error["message"]
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "qv"]
        assert llm.adapters == ["qv"]
        body = {"model": "qv", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == merged["qv"][0]


def test_the_environment_variable_allows_runtime_loading(tiny_dir, adapter_dirs, merged, monkeypatch):
    from fastapi.testclient import TestClient

    from llmasos import LLM
    from llmasos.serving import create_app

    monkeypatch.setenv("LLMASOS_ALLOW_RUNTIME_LORA", "1")
    llm = LLM.load(tiny_dir, max_batch_size=4)
    with live_server(llm, served_model_name="tiny") as url, httpx.Client(base_url=url, timeout=60) as http:
        assert load(http, "mlp", adapter_dirs["mlp"]).status_code == 200
        body = {"model": "mlp", "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == merged["mlp"][1]
        assert unload(http, "mlp").status_code == 200 and llm.adapters == []
    # The app's own argument wins over the environment.
    refused = TestClient(create_app(LLM.load(tiny_dir), allow_runtime_lora=False))
    assert load(refused, "mlp", adapter_dirs["mlp"]).status_code == 403


def test_serve_passes_allow_runtime_lora_to_the_app(tiny_dir, monkeypatch, capsys):
    import llmasos.serving
    from llmasos.cli import main

    seen = {}
    monkeypatch.setattr(llmasos.serving, "serve", lambda llm, **options: seen.update(options))
    monkeypatch.delenv("LLMASOS_ALLOW_RUNTIME_LORA", raising=False)
    assert main(["serve", str(tiny_dir), "--kv-cache-memory", "256KiB"]) == 0
    assert seen["allow_runtime_lora"] is None  # the app then reads the environment
    assert "runtime LoRA loading is on" not in capsys.readouterr().err
    assert main(["serve", str(tiny_dir), "--kv-cache-memory", "256KiB", "--allow-runtime-lora"]) == 0
    assert seen["allow_runtime_lora"] is True
    assert "runtime LoRA loading is on" in capsys.readouterr().err
