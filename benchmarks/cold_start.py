"""Time to first token of a cold model (its load included) against a warm one, through `llmasos serve`.

`llmasos serve` runs in its own process over a store holding the ~110M random checkpoint (bf16), each model
loaded on its first request. A cold request finds the model unloaded (`/api/stop` between rounds), so its
first token waits for the load; a warm one finds it loaded. The figures are the best of a few alternating
rounds (on a shared machine the best is the least disturbed) of one streamed completion (32-token prompt)
over loopback HTTP, from request sent to first text chunk.

Ollama behaves the same way (its published behaviour: a request for a model that is not loaded loads it
first, reported as `load_duration`; later requests within the keep-alive pay no load); the target here is
that a warm request pays no load: warm TTFT well under the cold one minus the load time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, random_checkpoint, wait_for_server

ROUNDS = int(os.environ.get("LLMASOS_BENCH_COLD_ROUNDS", "3"))
PROMPT = [(i * 7919) % 31000 + 100 for i in range(32)]


def _ttft(http, base: str) -> float:
    body = {"model": "small", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    with http.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def main() -> dict:
    import httpx

    from benchmarks.serve import _free_port

    checkpoint = random_checkpoint("small", "bfloat16")
    with tempfile.TemporaryDirectory() as home:
        (Path(home) / "models").mkdir()
        (Path(home) / "models" / "small").symlink_to(checkpoint.resolve(), target_is_directory=True)
        port = _free_port()
        env = {**os.environ, "LLMASOS_HOME": home}
        server = subprocess.Popen(
            [sys.executable, "-m", "llmasos", "serve", "--port", str(port), "--keep-alive", "10m"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        cold, warm, loads = [], [], []
        try:
            wait_for_server(server, base)
            with httpx.Client(timeout=600) as http:
                _ttft(http, base)  # first ever: the kernels build, the file enters the page cache
                for _ in range(ROUNDS):
                    http.post(f"{base}/api/stop", json={"model": "small"}).raise_for_status()
                    cold.append(_ttft(http, base))
                    loads.append(http.get(f"{base}/api/ps").json()["models"][0]["load_seconds"])
                    warm.append(min(_ttft(http, base) for _ in range(3)))
        finally:
            server.terminate()
            server.wait(60)
    c, w, load = min(cold), min(warm), statistics.median(loads)
    ok = w < 0.5 * c and w < c - 0.5 * load
    print_table(
        f"Time to first token, ~110M bf16 via `llmasos serve` (32-token prompt; best of {ROUNDS} rounds, load: median)",
        ["request", "TTFT (ms)", "of which load (ms)", "Ollama's behaviour", "verdict"],
        [
            ["cold (model not loaded)", f"{c * 1e3:.0f}", f"{load * 1e3:.0f}", "loads first (load_duration)", "-"],
            ["warm (within keep-alive)", f"{w * 1e3:.0f}", "0", "no load", "PASS" if ok else "FAIL"],
        ],
    )
    print(f"cold start: a warm request's TTFT is {w / c:.2f}x a cold one's ({'PASS' if ok else 'FAIL'}: it pays no load)")
    return {"cold_ttft_s": c, "warm_ttft_s": w, "load_s": load, "passed": int(ok), "checked": 1}


if __name__ == "__main__":
    main()
