"""Run every benchmark (or those named with --only) and print their tables."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = [
    "load_memory",
    "decode",
    "llamacpp",
    "train",
    "dpo",
    "prepare",
    "serve",
    "prefix_cache",
    "chunked_prefill",
    "cold_start",
    "structured",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these")
    args = parser.parse_args()
    # The machine first: figures from different CPUs (and kernel levels) are told apart by this header.
    from llmasos.kernels import system_report

    for key, value in system_report():
        print(f"# {key}: {value}")
    for name in args.only or BENCHMARKS:
        print(f"\n=== {name} ===")
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main()
