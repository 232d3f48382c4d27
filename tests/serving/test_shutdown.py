"""`llmasos serve` as users run it: SIGTERM stops accepting, lets the running request finish, exits 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from helpers import free_port


def test_sigterm_drains_the_running_request_and_exits_0(tiny_dir):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", str(tiny_dir), "--port", str(port),
                             "--served-model-name", "tiny", "--shutdown-timeout", "60"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        events: list[str] = []
        first = threading.Event()

        def read() -> None:
            body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        at_signal = list(events)
        time.sleep(0.5)
        refused = False
        try:
            httpx.get(f"{base}/health", timeout=2)
        except httpx.TransportError:
            refused = True
        reader.join(120)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert refused, "a new connection was accepted after SIGTERM"
    assert "data: [DONE]" not in at_signal and len(at_signal) < len(events)  # it was still running
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 600
