"""Ollama's API, through Ollama's own Python client against a live server: list, show, chat and generate,
streamed and not, ps, version, errors in Ollama's shape, and keep_alive as Ollama's clients send it."""

from __future__ import annotations

import httpx
import pytest
from helpers import API_KEY, live_server, make_pool

ollama = pytest.importorskip("ollama")

GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def url(store) -> str:
    with live_server(make_pool(names=["alpha", "beta", "truncated"]), api_key=API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return ollama.Client(host=url, headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.fixture(scope="module")
def alpha(store):
    from llmasos import LLM

    return LLM.load(store / "models" / "alpha")


def greedy(llm, prompt_ids: list[int], n: int = 12) -> str:
    from llmasos import SamplingParams

    return llm.generate(prompt_ids, SamplingParams(max_tokens=n, temperature=0))[0].text


def test_list_shows_the_models_with_ollama_fields(client):
    models = {m.model: m for m in client.list().models}
    assert sorted(models) == ["alpha:latest", "beta:latest", "truncated:latest"]
    alpha = models["alpha:latest"]
    assert alpha.size > 0 and len(alpha.digest) == 64 and alpha.modified_at is not None
    assert alpha.details.family == "llama" and alpha.details.format == "safetensors"
    assert alpha.details.quantization_level == "F32" and alpha.details.parameter_size.endswith("K")


def test_show_reads_a_model_without_loading_it(client, url):
    shown = client.show("beta")
    assert shown.modelinfo["llama.context_length"] == 256 and shown.modelinfo["llama.block_count"] == 2
    assert "<|start_header_id|>" in shown.template and shown.capabilities == ["completion"]
    assert "beta:latest" not in [m.model for m in client.ps().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nosuch")
    assert e.value.status_code == 404 and "`nosuch` does not exist" in e.value.error


def test_chat_not_streamed_equals_the_model_alone(client, alpha):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    answer = client.chat(model="alpha", messages=messages, stream=False, options=GREEDY)
    assert answer.message.role == "assistant" and answer.done and answer.done_reason in ("stop", "length")
    assert answer.message.content == greedy(alpha, alpha.chat_prompt(messages))
    assert answer.model == "alpha" and answer.eval_count <= 12 and answer.prompt_eval_count > 0
    assert answer.total_duration >= answer.eval_duration > 0


def test_chat_streamed_is_ndjson_with_a_final_summary(client, alpha):
    messages = [{"role": "user", "content": "Tell me a story"}]
    parts = list(client.chat(model="alpha:latest", messages=messages, stream=True, options=GREEDY))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and len(parts) > 2
    assert "".join(p.message.content for p in parts) == greedy(alpha, alpha.chat_prompt(messages))
    assert 0 < parts[-1].eval_count <= 12 and parts[-1].done_reason in ("stop", "length")


def test_generate_streamed_and_not(client, alpha):
    raw = client.generate(model="alpha", prompt="import json", raw=True, options=GREEDY)
    assert raw.response == greedy(alpha, alpha.tokenizer.encode("import json"))
    assert raw.context[: raw.prompt_eval_count] == alpha.tokenizer.encode("import json")
    templated = list(client.generate(model="alpha", prompt="Hi", system="Be brief.", stream=True, options=GREEDY))
    prompt = alpha.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert "".join(p.response for p in templated) == greedy(alpha, prompt) and templated[-1].done


def test_options_are_checked_and_named(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="alpha", prompt="hi", options={"temperature": -1})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="alpha", messages=[{"role": "user", "content": "hi"}], format="json")
    assert e.value.status_code == 400 and "format" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # a model that cannot load: the file, in Ollama's shape
        client.generate(model="truncated", prompt="hi")
    assert e.value.status_code == 500 and "truncated/model.safetensors" in e.value.error


def test_ps_and_keep_alive_as_ollama_sends_them(client):
    client.generate(model="beta", keep_alive="10m")  # no prompt: Ollama's way to load a model
    rows = {m.model: m for m in client.ps().models}
    assert rows["beta:latest"].size > 0 and rows["beta:latest"].context_length == 256
    assert rows["beta:latest"].expires_at is not None
    unloaded = client.generate(model="beta", keep_alive=0)  # and to unload one
    assert unloaded.done_reason == "unload"
    assert "beta:latest" not in [m.model for m in client.ps().models]


def test_version_and_the_api_key(url, client):
    assert client._client.get("/api/version").json()["version"]
    r = httpx.get(f"{url}/api/tags")  # no key
    assert r.status_code == 401 and "API key" in r.json()["error"]


def test_embed_gives_the_models_own_embeddings(client, alpha):
    texts = ["Once upon a time", "import json"]
    answer = client.embed(model="alpha", input=texts)
    expected = alpha.embed(texts)
    assert answer.model == "alpha" and answer.prompt_eval_count > 0
    assert max(abs(a - b) for got, want in zip(answer.embeddings, expected.tolist()) for a, b in zip(got, want)) < 1e-5
    assert len(client.embed(model="alpha", input="one text", dimensions=8).embeddings[0]) == 8
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="alpha", input=[""])
    assert e.value.status_code == 400 and "input[0]" in str(e.value)
