"""The official `openai` client (and raw HTTP where the client hides things) against a live server."""

import json

import pytest
import torch

MSG = [{"role": "user", "content": "Once upon a time"}]
LONG = {"ignore_eos": True}  # vLLM's extension: exactly max_tokens tokens, whatever the random model says


def test_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == 1024


def test_completion_usage_finish_reason_and_timings(client, http):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0, extra_body=LONG)
    prompt_tokens = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["count"]
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length" and out.choices[0].text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (prompt_tokens, 7, prompt_tokens + 7)
    timings = out.model_extra["timings"]
    assert timings["prompt_n"] == prompt_tokens and timings["predicted_n"] == 7
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0 and timings["predicted_per_second"] > 0


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=20, temperature=0, extra_body=LONG)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="def fibonacci(n):",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=LONG,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_with_and_without_streaming(client):
    whole = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=12, temperature=0, extra_body=LONG)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    chunks = list(
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0, stream=True, extra_body=LONG)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].model_extra["timings"]["predicted_n"] == 12


def test_chat_uses_the_models_template(client, http):
    prompt_ids = http.post("/tokenize", json={"messages": MSG}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": prompt_ids}).json()["prompt"]
    assert text == "user\n\nOnce upon a time" + "assistant\n\n"  # the template's special tokens are not printed
    out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=1)
    assert out.usage.prompt_tokens == len(prompt_ids)


def test_stop_sequence_cuts_the_text(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0)
    full = client.completions.create(**kw, extra_body=LONG).choices[0].text
    stop = full[6:8]
    out = client.completions.create(**kw, stop=[stop, "never-seen"], extra_body=LONG).choices[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]


def test_seed_reproduces_a_sample(client):
    kw = dict(
        model="tiny", prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9, extra_body={**LONG, "top_k": 50}
    )
    first, again = (client.completions.create(**kw, seed=7).choices[0].text for _ in range(2))
    other = client.completions.create(**kw, seed=8).choices[0].text
    assert first == again and first != other


def test_n_samples_and_penalties(client):
    out = client.chat.completions.create(
        model="tiny", messages=MSG, n=3, max_tokens=6, seed=1, presence_penalty=0.5, frequency_penalty=0.5, extra_body=LONG
    )
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 18
    assert len({c.message.content for c in out.choices}) > 1


def test_list_of_prompts_gives_one_choice_per_prompt(client):
    single = [
        client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0, extra_body=LONG) for p in ("hello", "fox")
    ]
    both = client.completions.create(model="tiny", prompt=["hello", "fox"], max_tokens=5, temperature=0, extra_body=LONG)
    assert [c.text for c in both.choices] == [s.choices[0].text for s in single]
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)


def test_chat_logprobs_are_those_of_the_chosen_tokens(client):
    out = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, extra_body=LONG
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:  # greedy: the chosen token is the likeliest one
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


@torch.inference_mode()
def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(http, llm):
    prompts = [[1, 50, 60, 70, 80], [5, 9, 33, 200]]
    for max_tokens in (0, 1):
        r = http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        for prompt, choice in zip(prompts, r.json()["choices"]):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(prompt) + max_tokens and lp["token_logprobs"][0] is None
            expected = llm.model(torch.tensor([prompt]))[0, :-1].float().log_softmax(-1)
            expected = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
            assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx(expected.tolist(), abs=1e-4)
            if max_tokens:  # lm-eval's is_greedy: the generated token's logprob is the top one at temperature 0
                assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    streamed = http.post(
        "/v1/completions", json={"prompt": prompts[0], "echo": True, "logprobs": 1, "max_tokens": 0, "stream": True}
    ).text.split("\n\n")
    assert streamed[-2:] == ["data: [DONE]", ""]
    assert len(json.loads(streamed[0][6:])["choices"][0]["logprobs"]["tokens"]) == len(prompts[0])


def test_tokenize_and_detokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    bare = http.post("/tokenize", json={"prompt": "The quick brown fox", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokens["tokens"][1:]  # the BOS token
    assert http.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": "The quick brown fox"}


def test_health_metrics_and_page_need_no_key(server):
    import httpx

    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server}/metrics").text
    for name in (
        "llmasos_requests_total",
        "llmasos_prompt_tokens_total",
        "llmasos_generation_tokens_total",
        "llmasos_num_sequences_running",
        "llmasos_num_requests_waiting",
        "llmasos_time_to_first_token_seconds_bucket",
        "llmasos_request_latency_seconds_bucket",
    ):
        assert f"\n{name}" in metrics, name
    page = httpx.get(server)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/chat/completions" in page.text


def test_metrics_count_requests_and_tokens(server, client):
    import httpx

    def value(text: str, line: str) -> float:
        found = [ln.split()[-1] for ln in text.splitlines() if ln.startswith(line + " ")]
        return float(found[0]) if found else 0.0

    before = httpx.get(f"{server}/metrics").text
    client.completions.create(model="tiny", prompt="hello", max_tokens=4, extra_body=LONG)
    after = httpx.get(f"{server}/metrics").text
    ok = 'llmasos_requests_total{route="/v1/completions",status="200"}'
    assert value(after, ok) == value(before, ok) + 1
    gen = 'llmasos_generation_tokens_total{model="tiny"}'
    assert value(after, gen) == value(before, gen) + 4


def test_raw_stream_ends_with_done(http):
    with http.stream(
        "POST", "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3, "stream": True, "ignore_eos": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


@torch.inference_mode()
def test_lm_eval_local_completions_reads_our_loglikelihoods(http, llm):
    """lm-eval's own parser over the request its `local-completions` model sends for a log-likelihood task."""
    api = pytest.importorskip("lm_eval.models.openai_completions").LocalCompletionsAPI
    info = http.get("/tokenizer_info").json()  # what its remote tokenizer backend reads
    assert info["eos_token"] == "<|end_of_text|>" and info["model_max_length"] == 1024
    context, continuation = [1, 50, 60, 70], [80, 90]
    tokens = context + continuation
    payload = {"model": "tiny", "prompt": [tokens], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    ((loglikelihood, greedy),) = api.parse_logprobs(http.post("/v1/completions", json=payload).json(), [tokens], [len(context)])
    logprobs = llm.model(torch.tensor([tokens]))[0].float().log_softmax(-1)
    expected = sum(logprobs[i - 1, tokens[i]].item() for i in range(len(context), len(tokens)))
    assert loglikelihood == pytest.approx(expected, abs=1e-4)
    assert greedy == all(logprobs[i - 1].argmax().item() == tokens[i] for i in range(len(context), len(tokens)))
