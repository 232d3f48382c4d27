"""Helpers shared by the benchmarks: random-weight checkpoints of real shapes, child processes, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("LLMASOS_BENCH_CACHE", Path(__file__).resolve().parent.parent / "bench-results" / "cache"))


# The ~110M shape of the reference measurements (not a published model).
SMALL = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=2048,
)


def bench_tokenizer(vocab_size: int) -> Path:
    """A byte-level BPE of `vocab_size` tokens trained on the standard library's sources (cached): decoding
    costs what a real tokenizer's does, and llama.cpp loads it from a GGUF export."""
    out = CACHE / f"tokenizer-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        from llmasos.quickstart import stdlib_files
        from llmasos.tokenization.train import train_bpe

        texts = (f.read_text(errors="replace") for f in stdlib_files(16 * 2**20))
        train_bpe(texts, vocab_size, out, progress=False)
    return out


def random_checkpoint(shape: str, dtype: str = "bfloat16", context: int | None = None) -> Path:
    """An HF dir with zoo shape `shape` (or "small") and random weights (speed and memory do not depend on values);
    context: another max_position_embeddings than the shape's."""
    out = CACHE / (f"{shape}-{dtype}-bpe" + (f"-ctx{context}" if context else ""))
    if (out / "config.json").exists():
        return out
    config = f"ModelConfig(**{SMALL!r})" if shape == "small" else f"zoo_config({shape!r})"
    if context:
        config = f"dataclasses.replace({config}, max_position_embeddings={context})"
    code = f"""
import dataclasses
import torch
from llmasos.checkpoints.hf import save_model
from llmasos.outputs import atomic_dir
from llmasos.tokenization import copy_tokenizer_files
from llmasos.models.config import ModelConfig
from llmasos.models.llama import Transformer
from llmasos.models.zoo import zoo_config
from pathlib import Path
torch.manual_seed(0)
with torch.device("meta"):
    model = Transformer({config})
model.to_empty(device="cpu")
model.to(getattr(torch, {dtype!r}))
with torch.no_grad():
    for name, p in model.named_parameters():
        p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
with atomic_dir(Path({str(out)!r}), replace=True) as tmp:
    save_model(model, tmp)
    copy_tokenizer_files(Path({str(bench_tokenizer(32000))!r}), tmp)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def run_child(code: str) -> dict:
    """Run `code` in a fresh interpreter (clean peak-RSS accounting); it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def wait_for_server(server: subprocess.Popen, base: str, timeout: float = 300) -> None:
    """Return once the `llmasos serve` process `server` answers GET {base}/health with 200; raise with the end of
    its stderr if it exits first or has not answered within `timeout` seconds."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llmasos serve did not start:\n{server.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
