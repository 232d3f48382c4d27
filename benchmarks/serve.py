"""The server under load, over HTTP on loopback: 16 concurrent streaming clients against one.

`llmasos serve` runs in its own process on the ~110M random checkpoint (bf16); each client streams a
completion of a 32-token prompt with a fixed number of new tokens (ignore_eos). Figures: aggregate
generated tokens/s (all tokens / wall time) and time to first token (request sent to first text chunk).

Target (issue: serving): 16 clients >= 5x the aggregate tokens/s of one client.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from benchmarks.common import print_table, random_checkpoint, wait_for_server

CLIENTS = 16
NEW = int(os.environ.get("LLMASOS_BENCH_SERVE_TOKENS", "48"))
PROMPT = [(i * 7919) % 31000 + 100 for i in range(32)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _client(http, url: str) -> tuple[float, int]:
    """(time to first token, tokens generated) of one streamed completion."""
    body = {
        "prompt": PROMPT,
        "max_tokens": NEW,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


async def _round(url: str, clients: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_client(http, url) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {
        "tok_s": sum(r[1] for r in results) / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
    }


def main() -> dict:
    path = random_checkpoint("small", "bfloat16")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llmasos", "serve", str(path), "--port", str(port), "--max-running", str(CLIENTS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(server, base)
        url = f"{base}/v1/completions"
        asyncio.run(_round(url, 1))  # warm-up: first-call allocations, the KV cache
        one, many = asyncio.run(_round(url, 1)), asyncio.run(_round(url, CLIENTS))
    finally:
        server.terminate()
        server.wait(60)
    ratio = many["tok_s"] / one["tok_s"]
    rows = [
        ["1 client", f"{one['tok_s']:.1f}", "1.00x", f"{one['ttft_p50'] * 1e3:.0f}", f"{one['ttft_p95'] * 1e3:.0f}", "-", "-"],
        [
            f"{CLIENTS} clients",
            f"{many['tok_s']:.1f}",
            f"{ratio:.2f}x",
            f"{many['ttft_p50'] * 1e3:.0f}",
            f"{many['ttft_p95'] * 1e3:.0f}",
            "5.00x",
            "PASS" if ratio >= 5 else "FAIL",
        ],
    ]
    print_table(
        f"llmasos serve, ~110M bf16, streamed completions over loopback HTTP ({len(PROMPT)}-token prompt, {NEW} new tokens each)",
        ["load", "generated tok/s (all clients)", "vs 1 client", "TTFT p50 (ms)", "TTFT p95 (ms)", "target", "verdict"],
        rows,
    )
    return {"passed": int(ratio >= 5), "checked": 1}


if __name__ == "__main__":
    main()
