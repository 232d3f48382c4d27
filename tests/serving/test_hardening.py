"""One request never hurts another: poison sent beside running streams, scoring through the queue, an event
loop that answers while a long prompt is encoded, unexpected errors that show nothing, the Host check, and
the key on the docs and from the environment."""

import json
import socket
import threading

import httpx
import pytest
from helpers import API_KEY, StepGate, live_server, make_hf_model, wait_for, write_bpe_tokenizer
from test_errors import metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = [[(11 * i + j) % 390 + 5 for j in range(3 + i)] for i in range(8)]
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


def streamed(base: str, body: dict, into: dict, key: int, headers: dict | None = None) -> threading.Thread:
    """POST a streamed completion in a thread; into[key] gets (status, text, finish reasons, error)."""

    def run() -> None:
        text, reasons, error = "", [], None
        with httpx.stream(
            "POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120, headers=headers or AUTH
        ) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                    for c in event.get("choices", []):
                        text += c["text"]
                        reasons += [c["finish_reason"]] if c["finish_reason"] else []
        into[key] = (status, text, reasons, error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_poisoned_request_beside_8_greedy_streams_fails_alone(server, http, gate, monkeypatch):
    from llmasos.serving.app import Service

    alone = [http.post("/v1/completions", json={"prompt": p, **GREEDY}).json()["choices"][0]["text"] for p in PROMPTS]
    real = Service.sampling

    def slipped_through(body, *args, **kwargs):  # a value the checks missed: what a bug would let in
        params = real(body, *args, **kwargs)
        if body.seed == 666:
            params.temperature = float("nan")
        return params

    monkeypatch.setattr(Service, "sampling", staticmethod(slipped_through))
    gate.hold_after(0)
    results: dict = {}
    threads = [streamed(server, {"prompt": p, **GREEDY}, results, i) for i, p in enumerate(PROMPTS)]
    assert wait_for(lambda: metric(server, "llmasos_num_requests_waiting") == 8)
    gate.hold_after(2)  # all 8 admitted together, then a token more, then held: running, not finished
    assert wait_for(lambda: metric(server, "llmasos_num_sequences_running") == 8)
    for poison in (
        b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "repetition_penalty": NaN}',
        b'{"prompt": "hi", "top_k": 18446744073709551616}',
        b'{"prompt": [-1]}',
        b'{"prompt": [400]}',
        b'{"prompt": "hi", "seed": 18446744073709551616}',
    ):
        r = http.post("/v1/completions", content=poison, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (poison, r.text)
    # Admitted while the streams run, then sampled in the same batch as they are.
    threads.append(streamed(server, {"prompt": PROMPTS[0], "max_tokens": 5, "seed": 666}, results, "slipped"))
    threads.append(streamed(server, {"prompt": PROMPTS[1], **GREEDY, "temperature": 1e-40}, results, "tiny_t"))
    assert wait_for(lambda: metric(server, "llmasos_num_requests_waiting") == 2)
    gate.release()
    for t in threads:
        t.join(120)
    assert [results[i][1] for i in range(8)] == alone
    assert all(results[i][2] == ["length"] and results[i][3] is None for i in range(8))
    assert results["tiny_t"][1] == alone[1]  # a temperature too small to divide by is greedy
    status, text, _, error = results["slipped"]
    assert status == 200 and error["code"] == "internal_error" and "nan" not in error["message"].lower()
    assert metric(server, "llmasos_num_sequences_running") == 0


def test_scored_prompts_wait_in_the_queue_and_leave_with_their_client(tiny_dir):
    from llmasos import LLM

    llm = LLM.load(tiny_dir, max_batch_size=1)
    gate = StepGate(llm.engine)
    gate.hold_after(0)
    body = json.dumps({"prompt": [[5, 6, 7], [8, 9], [10, 11, 12]], "echo": True, "logprobs": 1, "max_tokens": 0}).encode()
    with live_server(llm, max_queue=2) as base:
        port = int(base.rsplit(":", 1)[1])
        client = socket.create_connection(("127.0.0.1", port))  # a client this test hangs up on itself
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert wait_for(lambda: metric(base, "llmasos_num_requests_waiting") == 3)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [5], "echo": True, "logprobs": 1, "max_tokens": 0})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"  # scoring counts in the queue
        client.close()
        assert wait_for(lambda: metric(base, "llmasos_num_requests_waiting") == 0)  # gone with their client
        gate.release()
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [5, 6, 7], "echo": True, "logprobs": 1, "max_tokens": 0})
        scored = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert scored[0] is None and scored[1:] == pytest.approx(
            [e.logprob for e in llm.engine.prompt_logprobs([5, 6, 7])], abs=1e-5
        )


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """A tiny model with a 64k context: a megabyte of text passes the length check and takes a while to encode."""
    from llmasos import LLM

    path, _ = make_hf_model(tmp_path_factory.mktemp("long") / "tiny", max_position_embeddings=65536)
    write_bpe_tokenizer(path)
    return LLM.load(path, max_batch_size=2)


def test_the_event_loop_answers_while_long_text_is_encoded_and_rendered(long_context, monkeypatch):
    """Encoding a prompt and rendering a chat (seconds for a long one) run off the event loop: with each held
    mid-way by the test (not left to the machine's speed), /health still answers, and the request then ends as
    it would have."""
    inside, release = threading.Event(), threading.Event()

    def held(real):
        def run(*args, **kwargs):
            inside.set()
            assert release.wait(120), "the test never released the held work"
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(long_context.tokenizer, "encode", held(long_context.tokenizer.encode))
    monkeypatch.setattr(long_context, "chat_prompt", held(long_context.chat_prompt))
    with live_server(long_context) as base:
        bodies = [
            ("/v1/completions", {"prompt": "Once upon a time, " * 70_000, "max_tokens": 1}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}] * 16_000, "max_tokens": 1}),
        ]
        for route, body in bodies:
            inside.clear(), release.clear()
            answer: dict = {}
            content = json.dumps(body).encode()  # encoded here, not in the thread: the server shares this process
            worker = threading.Thread(
                target=lambda url=f"{base}{route}", content=content, answer=answer: answer.update(
                    r=httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=300)
                )
            )
            worker.start()
            assert inside.wait(120), f"{route} never reached the encoding"
            # Were the held work on the event loop, nothing could answer until the release.
            assert httpx.get(f"{base}/health", timeout=60).status_code == 200
            release.set()
            worker.join(300)
            assert answer["r"].status_code == 400 and answer["r"].json()["error"]["code"] == "context_length_exceeded"


def test_an_unexpected_error_is_a_bare_counted_500_that_passes_cors(llm, monkeypatch):
    from fastapi.testclient import TestClient

    from llmasos.serving import create_app
    from llmasos.serving.app import Router

    async def broken(self):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Router, "models", broken)
    origin = "http://localhost:3000"
    http = TestClient(create_app(llm, cors_origins=[origin]), raise_server_exceptions=False)
    r = http.get("/v1/models", headers={"Origin": origin})
    assert r.status_code == 500 and r.headers["access-control-allow-origin"] == origin
    assert r.json()["error"]["code"] == "internal_error" and "secret" not in r.text
    assert "llmasos_unexpected_errors_total 1.0" in http.get("/metrics").text


def test_with_a_key_the_docs_need_it_too(llm):
    from fastapi.testclient import TestClient

    from llmasos.serving import create_app

    http = TestClient(create_app(llm, api_key=API_KEY))
    for route in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(route).status_code == 401
        assert http.get(route, headers=AUTH).status_code == 200
    assert http.get("/health").status_code != 401  # 503 here: no lifespan, no engine thread; but no key needed


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("LOCALHOST:80", True),
        ("[::1]:8000", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("rebind.attacker.example", False),
        ("localhost.attacker.example", False),
        ("0.0.0.0:8000", False),
        ("192.168.1.10", False),
        ("", False),
    ],
)
def test_loopback_hosts(host, loopback):
    from llmasos.serving.app import is_loopback

    assert is_loopback(host) is loopback


def test_serve_takes_the_key_from_the_environment_and_plans_the_cache(tiny_dir, monkeypatch, capsys):
    import llmasos.serving
    from llmasos.cli import main

    seen = {}
    monkeypatch.setattr(llmasos.serving, "serve", lambda llm, **options: seen.update(llm=llm, **options))
    monkeypatch.setenv("LLMASOS_API_KEY", "sk-from-env")
    assert main(["serve", str(tiny_dir), "--kv-cache-memory", "256KiB", "--max-running", "4"]) == 0
    engine = seen["llm"].engine
    assert seen["api_key"] == "sk-from-env" and seen["host"] == "127.0.0.1"
    assert engine.cache_budget == 2**18 and engine.max_seq_len == engine.fit_len(1) == 512  # 512 bytes a slot
    assert "sequences of up to 512 tokens, 0 each when all 4 rows run" in capsys.readouterr().err
    assert main(["serve", str(tiny_dir), "--kv-cache-memory", "256KiB", "--max-model-len", "1024"]) == 1
    assert "does not fit the KV cache budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tiny_dir), "--kv-cache-memory", "lots"])
    assert "'lots' is not a size" in capsys.readouterr().err


def test_serve_paces_chunked_prefill_by_default_and_takes_a_number_or_0(tiny_dir, monkeypatch, capsys):
    import llmasos.serving
    from llmasos.cli import main

    seen = {}
    monkeypatch.setattr(llmasos.serving, "serve", lambda llm, **options: seen.update(llm=llm, **options))
    for flags, budget in (([], "auto"), (["--max-num-batched-tokens", "32"], 32), (["--max-num-batched-tokens", "0"], None)):
        assert main(["serve", str(tiny_dir), "--max-running", "4", *flags]) == 0
        assert seen["llm"].engine.max_num_batched_tokens == budget
        assert (seen["llm"].engine.pacer is not None) == (budget == "auto")
    assert main(["serve", str(tiny_dir), "--max-running", "8", "--max-num-batched-tokens", "4"]) == 1
    assert "--max-num-batched-tokens 4 is less than --max-running 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tiny_dir), "--max-num-batched-tokens", "fast"])
    assert "'fast' is neither auto nor a number of tokens" in capsys.readouterr().err
