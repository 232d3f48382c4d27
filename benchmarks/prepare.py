"""`llmasos prepare` throughput: tokens/s with 1 and 2 worker processes on the standard library's sources.

The corpus is ~8 MB of the running Python's standard library (the quickstart's corpus), the tokenizer
a byte-level BPE of 8192 tokens trained on it first. Issue (data and training): report tokens/s
with 2 workers.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table


def main() -> None:
    from llmasos.data.prepare import prepare
    from llmasos.quickstart import stdlib_files
    from llmasos.tokenization.train import train_bpe

    files = stdlib_files(8 * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_bpe((f.read_text(errors="replace") for f in files[:200]), 8192, tmp / "tok", progress=False)
        rows, base = [], None
        for workers in (1, 2):
            t = time.perf_counter()
            meta, stats, _ = prepare(files, tmp / "tok", tmp / f"data{workers}", workers=workers, progress=False)
            seconds = time.perf_counter() - t
            tokens = sum(split["tokens"] for split in meta["splits"].values())
            base = base or tokens / seconds
            rows.append(
                [
                    str(workers),
                    f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MB",
                    f"{tokens:,}",
                    f"{seconds:.1f}",
                    f"{tokens / seconds:,.0f}",
                    f"{tokens / seconds / base:.2f}x",
                ]
            )
    print_table(
        "prepare throughput (clean, dedup, tokenize, pack)",
        ["workers", "corpus", "tokens", "seconds", "tokens/s", "vs 1 worker"],
        rows,
    )


if __name__ == "__main__":
    main()
