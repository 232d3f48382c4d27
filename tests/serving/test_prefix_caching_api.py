"""Prefix caching and chunked prefill over HTTP: `usage.prompt_tokens_details.cached_tokens` as OpenAI reports it,
the cache on /metrics, and a chunked server answering as the whole-prompt one does."""

import uuid

import httpx
import pytest
from helpers import live_server

from llmasos import LLM
from llmasos.inference.prefix_cache import BLOCK_SIZE

GREEDY = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})


def system_prompt() -> str:
    """A system prompt no other test's starts like (a cached block holds its first tokens too)."""
    return f"{uuid.uuid4().hex} You are a careful assistant. " + "Answer every question in one short sentence. " * 12


def metric(text: str, name: str) -> float:
    """A metric's value, summed over its labels (the model's name)."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def test_chat_usage_reports_the_cached_prompt_tokens_streamed_or_not(client, server):
    system = system_prompt()
    ask = [{"role": "system", "content": system}, {"role": "user", "content": "Where is the fox?"}]
    first = client.chat.completions.create(messages=ask, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = [{"role": "system", "content": system}, {"role": "user", "content": "Why is the dog lazy?"}]
    second = client.chat.completions.create(messages=again, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 2 * BLOCK_SIZE and cached % BLOCK_SIZE == 0 and cached > 0
    chunks = list(client.chat.completions.create(messages=again, stream=True, stream_options={"include_usage": True}, **GREEDY))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= cached  # now the whole of the same prompt, but its last token
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content
    metrics = httpx.get(f"{server}/metrics").text
    assert metric(metrics, "llmasos_prefix_cache_hits_total") >= cached + usage.prompt_tokens_details.cached_tokens
    assert metric(metrics, "llmasos_prefix_cache_queries_total") >= metric(metrics, "llmasos_prefix_cache_hits_total")
    assert 0 < metric(metrics, "llmasos_prefix_cache_hit_rate") <= 1
    assert metric(metrics, "llmasos_prefix_cache_tokens") >= cached


def test_completions_usage_reports_the_cached_prompt_tokens(client, http):
    prefix = [(7 * i + 11) % 380 + 10 for i in range(70)]
    client.completions.create(prompt=prefix + [5, 6], **GREEDY)
    out = client.completions.create(prompt=prefix + [7, 8, 9], **GREEDY)
    assert out.usage.prompt_tokens_details.cached_tokens == 64
    body = {"model": "tiny", "prompt": prefix + [7, 8, 9], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    raw = http.post("/v1/completions", json=body).json()
    assert raw["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}
    assert raw["timings"]["cache_n"] == 64 and raw["timings"]["prompt_n"] == 9


@pytest.mark.parametrize("budget", [16, "auto"])
def test_a_server_prefilling_in_chunks_answers_as_the_whole_prompt_one(llm, client, budget):
    import openai

    prompt = [(13 * i + 5) % 380 + 10 for i in range(300)]
    want = client.completions.create(prompt=prompt, **GREEDY).choices[0].text
    chunked = LLM(llm.model, llm.tokenizer, max_batch_size=4, max_num_batched_tokens=budget, enable_prefix_caching=False)
    with live_server(chunked, served_model_name="tiny") as url:
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        out = other.completions.create(prompt=prompt, **GREEDY)
        metrics = httpx.get(f"{url}/metrics").text
    assert out.choices[0].text == want and out.usage.prompt_tokens_details.cached_tokens == 0
    paced = budget == "auto"  # what the pacer allows, and the decode step it times, once a step was timed
    assert ("llmasos_prefill_chunk_tokens{" in metrics) == paced and ("llmasos_decode_step_seconds{" in metrics) == paced
    if paced:
        assert metric(metrics, "llmasos_prefill_chunk_tokens") >= 8 and metric(metrics, "llmasos_decode_step_seconds") > 0
