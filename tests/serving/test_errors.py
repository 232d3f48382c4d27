"""Client mistakes get OpenAI-shaped 4xx answers while a long stream runs on, and clients that leave free
their rows at once. Where a request must still be running, the test holds the engine's steps (`gate`)
rather than count on the machine being slow."""

import json
import threading

import httpx
import pytest
from helpers import API_KEY, StepGate, live_server, wait_for

LONG = 900  # tokens


def metric(base: str, name: str) -> float:
    """A metric's value, summed over its labels (a model's metrics carry its name)."""
    text = httpx.get(f"{base}/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{"))]
    assert values, f"{name} is not in /metrics"
    return sum(values)


class LongStream(threading.Thread):
    """A streamed completion of `tokens` tokens, read to the end; `started` is set at its first chunk."""

    def __init__(self, base: str, tokens: int = LONG, key: str | None = API_KEY):
        super().__init__(daemon=True)
        self.base, self.tokens, self.key = base, tokens, key
        self.started = threading.Event()
        self.events: list[str] = []
        self.status = None

    def run(self) -> None:
        body = {
            "prompt": "Once upon a time",
            "max_tokens": self.tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        with httpx.stream("POST", f"{self.base}/v1/completions", json=body, headers=headers, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line:
                    self.events.append(line)
                    self.started.set()
        self.started.set()

    def usage(self) -> dict:
        return json.loads(self.events[-2][6:])["usage"]


CONTEXT, VOCAB = 1024, 400
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
USER_JSON = json.dumps(USER)
ERRORS = [
    # Values that once reached the engine's shared step and failed every request in it, and ids and seeds
    # that overflowed: each is refused before any work, naming the field.
    (COMPLETIONS, b'{"prompt": "hello", "temperature": NaN}', None, 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "hello", "temperature": 1e999}', None, 400, "temperature"),
    (CHAT, b'{"messages": %s, "repetition_penalty": NaN}' % USER_JSON.encode(), None, 400, "repetition_penalty"),
    (CHAT, b'{"messages": %s, "top_p": NaN}' % USER_JSON.encode(), None, 400, "top_p"),
    (COMPLETIONS, b'{"prompt": "hello", "min_p": -Infinity}', None, 400, "min_p"),
    (COMPLETIONS, {"prompt": "hello", "top_k": 18446744073709551616}, None, 400, "top_k"),
    (COMPLETIONS, {"prompt": [-1]}, None, 400, "prompt"),
    (COMPLETIONS, {"prompt": [VOCAB]}, None, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[5, 6], [2**70]]}, None, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hello", "seed": 2**64}, None, 400, "seed"),
    (COMPLETIONS, {"prompt": "hello", "logprobs": 2**64}, None, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "hello", "max_tokens": 2**64}, None, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hello", "stop": ["x"] * 17}, None, 400, "stop"),
    (COMPLETIONS, {"prompt": "hello", "stop": "x" * 600}, None, 400, "stop"),
    (COMPLETIONS, {"prompt": "hello", "n": 17}, None, 400, "n"),
    # n and prompts are bounded on every path, scoring included: a 400 saying the limit, not "busy".
    (COMPLETIONS, {"prompt": "hello", "echo": True, "max_tokens": 0, "n": 1000000}, None, 400, "n"),
    (COMPLETIONS, {"prompt": [[5, 6]] * 81, "max_tokens": 1}, None, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[5] * 1000] * 13, "echo": True, "logprobs": 20, "max_tokens": 0}, None, 400, "prompt"),
    # Text far beyond the context is refused before it is encoded or rendered.
    (COMPLETIONS, {"prompt": "hello " * 100_000}, None, 400, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "hello world"}] * 10_000}, None, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}] * 20_000}, None, 422, "messages"),
    ("/tokenize", {"prompt": "hello " * 100_000}, None, 400, "prompt"),
    ("/detokenize", {"tokens": [5, 2**70]}, None, 400, "tokens"),
    # A web page that re-points its own domain at 127.0.0.1 (DNS rebinding) is not answered.
    (COMPLETIONS, {"prompt": "hello"}, {"Host": "rebind.attacker.example"}, 400, None),
    # (route, body or raw bytes, headers, status, param)
    (COMPLETIONS, {"prompt": [5] * (CONTEXT + 10)}, None, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hello", "max_tokens": CONTEXT}, None, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": 5000}, None, 400, "max_completion_tokens"),
    (COMPLETIONS, {"prompt": "hello", "temperature": -1}, None, 400, "temperature"),
    (CHAT, {"messages": USER, "top_p": 1.5}, None, 400, "top_p"),
    (COMPLETIONS, {"prompt": "hello", "top_p": 0}, None, 400, "top_p"),
    (COMPLETIONS, {"prompt": "hello", "max_tokens": 0}, None, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": -3}, None, 400, "max_tokens"),
    (CHAT, {"messages": []}, None, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "messages[0].role"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, None, 400, "top_logprobs"),
    (COMPLETIONS, {"prompt": "hello", "stream_options": {"include_usage": True}}, None, 400, "stream_options"),
    (CHAT, {"messages": USER}, {"Authorization": ""}, 401, None),
    (CHAT, {"messages": USER}, {"Authorization": "Bearer wrong"}, 401, None),
    (COMPLETIONS, {"prompt": "hello", "model": "gpt-4"}, None, 404, "model"),
    (COMPLETIONS, {"prompt": "x" * (2**20 + 10)}, None, 413, None),
    (COMPLETIONS, b'{"prompt": "hello", ', None, 422, None),
    (CHAT, {"messages": "hello"}, None, 422, "messages"),
    (COMPLETIONS, {"prompt": "hello", "temperature": "hot"}, None, 422, "temperature"),
    (COMPLETIONS, {"prompt": ["hello", 3]}, None, 422, None),
]


def test_every_error_during_a_long_stream(server, gate):
    gate.hold_after(3)  # the stream's prefill and two tokens; then it waits, running, until released
    stream = LongStream(server)
    stream.start()
    assert stream.started.wait(30)
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        for route, body, headers, status, param in ERRORS:
            sent = (
                dict(content=body, headers={"Content-Type": "application/json", **(headers or {})})
                if isinstance(body, bytes)
                else dict(json=body, headers=headers)
            )
            r = http.post(route, **sent)
            assert r.status_code == status, (body if len(str(body)) < 200 else route, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            if param is not None:
                assert error["param"] == param, (param, error)
        assert http.get("/nowhere").json()["error"]["code"] == "not_found"
        assert metric(server, "llmasos_num_sequences_running") == 1  # the stream was still running throughout
        assert metric(server, "llmasos_unexpected_errors_total") == 0
    gate.release()
    stream.join(60)
    assert stream.status == 200 and stream.events[-1] == "data: [DONE]"
    assert stream.usage()["completion_tokens"] == LONG
    finish = [json.loads(e[6:])["choices"] for e in stream.events[:-1]]
    assert [c[0]["finish_reason"] for c in finish if c and c[0]["finish_reason"]] == ["length"]


def test_the_context_error_names_the_limit(http):
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1020})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "context of 1024 tokens" in r.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, gate):
    gate.hold_after(3)
    before = metric(server, "llmasos_generation_tokens_total")
    body = {"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}
    ) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
        assert metric(server, "llmasos_num_sequences_running") == 1
    assert wait_for(lambda: metric(server, "llmasos_num_sequences_running") == 0, timeout=10)
    assert metric(server, "llmasos_generation_tokens_total") - before < 10  # what ran before the hold


def test_a_non_streaming_client_that_times_out_frees_its_row(server, gate):
    gate.hold_after(2)  # the answer can never be ready before the client's timeout
    body = {"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=0.5, headers={"Authorization": f"Bearer {API_KEY}"})
    assert wait_for(lambda: metric(server, "llmasos_num_sequences_running") == 0, timeout=10)


def test_a_full_queue_answers_503_and_the_server_serves_on(tiny_dir):
    from llmasos import LLM

    llm = LLM.load(tiny_dir, max_batch_size=1)
    gate = StepGate(llm.engine)
    gate.hold_after(3)
    with live_server(llm, max_queue=1) as base:
        running, waiting = LongStream(base, tokens=600, key=None), LongStream(base, tokens=600, key=None)
        running.start()
        assert running.started.wait(30)
        waiting.start()
        assert wait_for(lambda: metric(base, "llmasos_num_requests_waiting") == 1, timeout=10)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        gate.release()
        running.join(60)
        waiting.join(60)
        assert running.usage()["completion_tokens"] == waiting.usage()["completion_tokens"] == 600
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert 'llmasos_requests_total{route="/v1/completions",status="503"} 1.0' in httpx.get(f"{base}/metrics").text


def test_an_engine_failure_ends_the_stream_with_an_error_and_the_server_serves_on(tiny_dir):
    from llmasos import LLM

    llm = LLM.load(tiny_dir, max_batch_size=4)
    real_step, failures = llm.engine.step, [RuntimeError("out of memory (simulated)")] * 2

    def step():
        if failures:
            raise failures.pop()
        return real_step()

    llm.engine.step = step
    with live_server(llm) as base:
        body = {"prompt": "hello", "max_tokens": 5, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert error["code"] == "internal_error" and "memory" not in error["message"]  # nothing internal shows
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hello", "max_tokens": 5}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "memory" not in r.json()["error"]["message"] and metric(base, "llmasos_unexpected_errors_total") == 2
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hello", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert metric(base, "llmasos_num_sequences_running") == 0


def test_cors_preflight_needs_no_key_and_a_chunked_body_is_still_limited(llm):
    from fastapi.testclient import TestClient

    from llmasos.serving import create_app

    origin = "http://localhost:3000"
    app = create_app(llm, api_key=API_KEY, cors_origins=[origin], max_body_bytes=1000)
    http = TestClient(app)  # no lifespan: the engine thread is not started, and nothing here needs it
    preflight = http.options(
        "/v1/chat/completions",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    refused = http.post("/v1/chat/completions", json={"messages": []}, headers={"Origin": origin})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
    assert (
        http.options("/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}).status_code
        == 400
    )
    chunked = http.post(
        "/v1/completions",
        content=iter([b'{"prompt": "', b"x" * 2000, b'"}']),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
