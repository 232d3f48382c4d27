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

# `llmasos serve` whose engine holds after its first steps while the file argv[1] exists: the test, not the
# machine's speed, decides that the request is still running when SIGTERM comes.
GATED_SERVE = """
import os, sys, time
from llmasos.cli import main
from llmasos.inference.engine import Engine

step, hold, steps = Engine.step, sys.argv[1], [0]

def gated(self):
    steps[0] += 1
    if steps[0] > 3 and os.path.exists(hold):
        time.sleep(0.002)
        return []
    return step(self)

Engine.step = gated
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_drains_the_running_request_and_exits_0(tiny_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hold = tmp_path / "hold"
    hold.touch()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            GATED_SERVE,
            str(hold),
            "serve",
            str(tiny_dir),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--shutdown-timeout",
            "60",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
            body = {
                "model": "tiny",
                "prompt": "Once upon a time",
                "max_tokens": 600,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
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
        refused = False
        deadline = time.monotonic() + 30
        while not refused and time.monotonic() < deadline:  # uvicorn closes its socket soon after the signal
            try:
                httpx.get(f"{base}/health", timeout=2)
                time.sleep(0.05)
            except httpx.TransportError:
                refused = True
        at_refusal = list(events)
        hold.unlink()
        reader.join(120)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert refused, "a new connection was accepted after SIGTERM"
    assert "data: [DONE]" not in at_refusal and len(at_signal) < len(events)  # it was still running
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 600
