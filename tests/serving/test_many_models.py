"""One server for the whole store: models loaded on demand, kept for their keep-alive, unloaded to fit the
memory budget or when asked, faults kept with their model, and `llmasos ps` / `llmasos stop` over it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import STORE_MODELS, Clock, live_server, make_pool, wait_for

MAX_TOKENS = 10
PROMPTS = [[(11 * i + j) % 380 + 7 for j in range(4 + i)] for i in range(3)]


def complete(url: str, model: str, prompt, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def loaded(url: str) -> list[str]:
    return [m["model"] for m in httpx.get(f"{url}/api/ps").json()["models"]]


def metric(url: str, line: str) -> float:
    found = [ln.split()[-1] for ln in httpx.get(f"{url}/metrics").text.splitlines() if ln.startswith(line + " ")]
    return float(found[0]) if found else 0.0


@pytest.fixture(scope="module")
def alone(store) -> dict[str, list[str]]:
    """Each model's greedy answers to PROMPTS, served alone (its own LLM, one request at a time)."""
    from llmasos import LLM, SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    answers = {}
    for name in STORE_MODELS:
        llm = LLM.load(store / "models" / name, max_batch_size=8)
        answers[name] = [llm.generate(p, params)[0].text for p in PROMPTS]
    return answers


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def pool(store, clock):
    return make_pool(clock)


@pytest.fixture(scope="module")
def url(pool) -> str:
    with live_server(pool) as url:
        yield url


def test_models_lists_the_whole_store(url):
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert sorted(cards) == ["alpha", "badconfig", "beta", "gamma", "truncated"]
    assert cards["alpha"]["max_model_len"] == 256 and cards["badconfig"]["max_model_len"] is None


def test_interleaved_requests_to_three_models_equal_each_served_alone(url, alone):
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in STORE_MODELS] * 2  # a, b, g, a, b, g, ...
    with ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(lambda job: complete(url, job[0], PROMPTS[job[1]]), jobs))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    for (name, i), r in zip(jobs, answers):
        assert r.json()["model"] == name and r.json()["choices"][0]["text"] == alone[name][i], (name, i)
    for name in STORE_MODELS:  # two clients at once for an unloaded model: one load
        assert metric(url, f'llmasos_model_loads_total{{model="{name}"}}') == 1
        assert metric(url, f'llmasos_generation_tokens_total{{model="{name}"}}') == 2 * len(PROMPTS) * MAX_TOKENS


def test_ps_shows_the_loaded_models(url, alone):
    for name in STORE_MODELS:
        assert complete(url, name, PROMPTS[0]).status_code == 200
    answer = httpx.get(f"{url}/api/ps").json()
    rows = {m["model"]: m for m in answer["models"]}
    assert sorted(rows) == [f"{name}:latest" for name in STORE_MODELS]
    for row in rows.values():
        assert row["size"] == row["weights_size"] + row["kv_cache_size"] and row["weights_size"] > 0
        assert row["running"] == row["waiting"] == 0 and row["context_length"] == 256
        assert row["expires_in"] == pytest.approx(300, abs=1) and row["expires_at"].endswith("Z")
    assert answer["memory_used"] == sum(r["size"] for r in rows.values())
    running = f'llmasos_num_sequences_running{{model="{next(iter(STORE_MODELS))}"}}'
    assert running in httpx.get(f"{url}/metrics").text


def test_llmasos_ps_and_stop(url, capsys):
    from llmasos.cli import main

    port = url.rsplit(":", 1)[1]
    assert complete(url, "beta", PROMPTS[0]).status_code == 200
    assert main(["ps", "--port", port]) == 0
    shown = capsys.readouterr().out
    assert "beta:latest" in shown and "in 5 min" in shown
    assert main(["stop", "beta", "--port", port]) == 0
    assert "unloaded beta" in capsys.readouterr().err
    assert "beta:latest" not in loaded(url)
    assert main(["stop", "beta", "--port", port]) == 0
    assert "beta was not loaded" in capsys.readouterr().err
    assert main(["stop", "nosuch", "--port", port]) == 1
    assert "`nosuch` does not exist" in capsys.readouterr().err
    assert main(["ps", "--port", "1"]) == 1  # nothing listens there
    assert "no server at" in capsys.readouterr().err


def test_each_model_has_its_own_engine_a_held_one_holds_no_other(url, pool, alone):
    from helpers import StepGate

    for name in ("alpha", "beta"):
        assert complete(url, name, PROMPTS[0]).status_code == 200
    gate = StepGate(pool.loaded["alpha"].llm.engine)
    gate.hold_after(0)  # alpha's engine makes no progress until released
    try:
        with ThreadPoolExecutor(1) as ex:
            held = ex.submit(complete, url, "alpha", PROMPTS[1])
            assert wait_for(lambda: metric(url, 'llmasos_num_requests_waiting{model="alpha"}') == 1)
            assert complete(url, "beta", PROMPTS[2]).json()["choices"][0]["text"] == alone["beta"][2]
            assert not held.done()
            gate.release()
            assert held.result().json()["choices"][0]["text"] == alone["alpha"][1]
    finally:
        gate.remove()


def test_keep_alive_runs_out_on_the_pool_clock(url, clock):
    assert complete(url, "alpha", PROMPTS[0], keep_alive="30s").status_code == 200
    assert complete(url, "gamma", PROMPTS[0], keep_alive=-1).status_code == 200
    assert httpx.post(f"{url}/tokenize", json={"model": "gamma", "prompt": "hi"}).status_code == 200  # keeps it
    rows = {m["name"]: m for m in httpx.get(f"{url}/api/ps").json()["models"]}
    assert rows["alpha:latest"]["expires_in"] == pytest.approx(30, abs=1)
    assert rows["gamma:latest"]["expires_at"] is None and rows["gamma:latest"]["keep_alive"] == -1
    clock.advance(29)
    time.sleep(0.2)  # ten ticks: nothing is due yet
    assert "alpha:latest" in loaded(url)
    clock.advance(2)
    assert wait_for(lambda: "alpha:latest" not in loaded(url))
    assert "gamma:latest" in loaded(url)  # -1: the same ticks kept it
    assert complete(url, "gamma", PROMPTS[0], keep_alive=0).status_code == 200  # 0: unloaded after the answer
    assert wait_for(lambda: "gamma:latest" not in loaded(url))


def test_a_bad_keep_alive_is_a_400(url):
    r = complete(url, "alpha", PROMPTS[0], keep_alive="5 parsecs")
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"


def test_an_unknown_model_is_a_404_naming_the_served_ones(url):
    r = complete(url, "nosuch", PROMPTS[0])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "`alpha`, `badconfig`, `beta`, `gamma`, `truncated`" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # several models: name one


def test_a_broken_model_fails_its_requests_alone(url, alone, store):
    with ThreadPoolExecutor(3) as ex:
        truncated = ex.submit(complete, url, "truncated", PROMPTS[0])
        bad = ex.submit(complete, url, "badconfig", PROMPTS[0])
        good = ex.submit(complete, url, "alpha", PROMPTS[1])
    for r, file in ((truncated.result(), "truncated/model.safetensors"), (bad.result(), "badconfig/config.json")):
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        assert str(store / "models" / file) in r.json()["error"]["message"]
    assert good.result().json()["choices"][0]["text"] == alone["alpha"][1]
    assert not {"truncated:latest", "badconfig:latest"} & set(loaded(url))
    r = httpx.post(f"{url}/api/generate", json={"model": "truncated", "prompt": "hi"})  # Ollama's shape
    assert r.status_code == 500 and "truncated/model.safetensors" in r.json()["error"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def big(store) -> Path:
    """A model with ~50 MB of weights, so that its load and unload show in the process's RSS."""
    from helpers import make_hf_model, write_bpe_tokenizer

    path = store / "models" / "zbig"
    make_hf_model(path, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8)
    write_bpe_tokenizer(path)
    yield path
    import shutil

    shutil.rmtree(path)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_an_unloaded_model_gives_its_memory_back(big):
    from llmasos.serving.pool import reclaim

    clock = Clock()
    with live_server(make_pool(clock, names=["zbig"], kv_cache_memory=8 * 2**20)) as url:
        reclaim()
        before = rss()
        assert complete(url, "zbig", PROMPTS[0], keep_alive="1m").status_code == 200
        [row] = httpx.get(f"{url}/api/ps").json()["models"]
        weights = row["weights_size"]
        assert weights > 40e6
        reclaim()
        held = rss()
        assert held - before > 0.8 * weights  # every weight was read by the forward passes
        clock.advance(61)
        assert wait_for(lambda: loaded(url) == [])
        reclaim()
        after = rss()
        print(f"RSS {before / 1e6:.0f} MB, loaded {held / 1e6:.0f}, unloaded {after / 1e6:.0f}; weights {weights / 1e6:.0f}")
        assert held - after > 0.8 * weights


def sizes(store, names, kv_cache_memory) -> dict[str, int]:
    from llmasos.serving.pool import LoadOptions, estimate

    options = LoadOptions(max_running=8, kv_cache_memory=kv_cache_memory)
    return {n: sum(estimate(store / "models" / n, options, kv_cache_memory)) for n in names}


def test_a_budget_for_one_model_swaps_them_without_error(store, alone):
    names = ["alpha", "beta"]
    need = sizes(store, names, 2**20)
    pool = make_pool(memory_budget=int(max(need.values()) * 1.5), kv_cache_memory=2**20)
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in names] * 2
    with live_server(pool) as url, ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(lambda job: complete(url, job[0], PROMPTS[job[1]]), jobs))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        assert [r.json()["choices"][0]["text"] for r in answers] == [alone[n][i] for n, i in jobs]
        for name in names:  # the same model answered, loaded again after the other took its place
            assert complete(url, name, PROMPTS[0]).json()["choices"][0]["text"] == alone[name][0]
            assert loaded(url) == [f"{name}:latest"]
        assert sum(metric(url, f'llmasos_model_unloads_total{{model="{n}"}}') for n in names) >= 2
        assert httpx.get(f"{url}/api/ps").json()["memory_used"] <= pool.memory_budget


def test_a_model_that_can_never_fit_is_refused_with_what_it_needs(store):
    need = sizes(store, ["alpha"], 2**20)["alpha"]
    with live_server(make_pool(memory_budget=need // 2, kv_cache_memory=2**20)) as url:
        r = complete(url, "alpha", PROMPTS[0])
        assert r.status_code == 400 and r.json()["error"]["code"] == "insufficient_memory"
        message = r.json()["error"]["message"]
        assert "`alpha` needs" in message and "the memory budget is" in message and "KV cache" in message
        assert loaded(url) == [] and complete(url, "beta", PROMPTS[0]).status_code == 400


class Gate:
    """A loader that waits for the test before it loads (and counts its calls)."""

    def __init__(self) -> None:
        self.started, self.go, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, path, options, cache_budget, cancelled):
        from llmasos.serving.pool import load

        self.calls += 1
        self.started.set()
        assert self.go.wait(60)
        return load(path, options, cache_budget, cancelled)


def test_a_load_cancelled_by_its_only_client_leaves_nothing(store, alone):
    gate = Gate()
    pool = make_pool(loader=gate)
    with live_server(pool) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its model loads
            httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": PROMPTS[0]}, timeout=httpx.Timeout(60, read=1))
        assert wait_for(lambda: "alpha" in pool.loading and pool.loading["alpha"].cancelled.is_set())
        gate.go.set()  # the loader goes on, sees the cancel and stops
        assert wait_for(lambda: not pool.loading)
        assert loaded(url) == [] and pool.used() == 0 and not pool.loaded
        assert metric(url, 'llmasos_model_load_failures_total{model="alpha"}') == 1
        assert complete(url, "alpha", PROMPTS[0]).json()["choices"][0]["text"] == alone["alpha"][0]  # loads anew
        assert gate.calls == 2


def test_two_clients_for_one_unloaded_model_cause_one_load(store, alone):
    gate = Gate()
    pool = make_pool(loader=gate)
    with live_server(pool) as url, ThreadPoolExecutor(2) as ex:
        answers = [ex.submit(complete, url, "beta", PROMPTS[i]) for i in range(2)]
        assert wait_for(lambda: "beta" in pool.loading and pool.loading["beta"].waiters == 2)
        gate.go.set()
        assert [a.result().json()["choices"][0]["text"] for a in answers] == alone["beta"][:2]
        assert gate.calls == 1 and metric(url, 'llmasos_model_loads_total{model="beta"}') == 1


def test_stop_during_a_load_cancels_it_and_its_clients_are_told(store):
    gate = Gate()
    pool = make_pool(loader=gate)
    with live_server(pool) as url, ThreadPoolExecutor(2) as ex:
        waiting = ex.submit(complete, url, "gamma", PROMPTS[0])
        assert gate.started.wait(30)
        stopping = ex.submit(httpx.post, f"{url}/api/stop", json={"model": "gamma"}, timeout=60)
        assert wait_for(lambda: pool.loading["gamma"].cancelled.is_set())
        gate.go.set()
        assert stopping.result().json() == {"model": "gamma", "unloaded": False}
        r = waiting.result()
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_cancelled"
        assert loaded(url) == [] and pool.used() == 0


@pytest.mark.slow
def test_llmasos_serve_without_a_model_serves_the_store(store):
    """The command line end to end: `serve --models`, a request, `ps`, `stop`, SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import free_port

    port = str(free_port())
    env = {**os.environ, "LLMASOS_HOME": str(store)}
    server = subprocess.Popen(
        [sys.executable, "-m", "llmasos", "serve", "--models", "alpha,beta", "--port", port, "--memory-budget", "1GiB"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: server.poll() is None and _up(url), timeout=120), server.stderr
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["alpha", "beta"]
        assert complete(url, "gamma", PROMPTS[0]).status_code == 404
        assert complete(url, "beta", PROMPTS[0]).status_code == 200
        cli = [sys.executable, "-m", "llmasos"]
        shown = subprocess.run([*cli, "ps", "--port", port], env=env, capture_output=True, text=True)
        assert shown.returncode == 0 and "beta:latest" in shown.stdout, shown.stderr
        stopped = subprocess.run([*cli, "stop", "beta"], env={**env, "LLMASOS_HOST": f"127.0.0.1:{port}"}, capture_output=True)
        assert stopped.returncode == 0 and loaded(url) == []
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    assert "serving 2 models (alpha, beta)" in server.stderr.read()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_an_adapter_loads_onto_the_model_named_and_requests_by_its_name_reach_it(store, tmp_path):
    """Over a whole store, `/v1/load_lora_adapter` takes the model to load onto (`model`), the adapter is listed
    with that model as its parent, and a request naming the adapter is served by that model with it."""
    from helpers import write_lora_adapter

    from llmasos import LLM, SamplingParams

    base = "alpha"
    adapter = write_lora_adapter(store / "models" / base, tmp_path / "qv", seed=3)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected = LLM.load(adapter, max_batch_size=8).generate(PROMPTS[0], params)[0].text  # the merged model
    with live_server(make_pool(Clock()), allow_runtime_lora=True) as url:
        load = {"lora_name": "qv", "lora_path": str(adapter)}
        r = httpx.post(f"{url}/v1/load_lora_adapter", json=load, timeout=120)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # several models: which one?
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={**load, "model": base}, timeout=120)
        assert r.status_code == 200, r.text
        cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert cards["qv"]["parent"] == base and set(STORE_MODELS) < set(cards)
        assert complete(url, "qv", PROMPTS[0]).json()["choices"][0]["text"] == expected
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "qv"}, timeout=120)
        assert r.status_code == 200, r.text
        assert complete(url, "qv", PROMPTS[0]).status_code == 404
