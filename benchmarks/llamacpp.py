"""Decode speed against llama.cpp (llama-cpp-python) on the same weights, same run, 2 threads.

The random checkpoints of the decode benchmark are exported with `llmasos export --format gguf`
(f32 and bf16 for the ~110M shape; bf16, q8_0 and q4_0 for the tinyllama-1.1b shape) and each pair
runs in one child process, alternating rounds: ours at batch 1 in the matching dtype (fp32, bf16,
int8 for q8_0, int4 for q4_0) against llama.cpp decoding the same prompt token by token. The
reference figures (llama.cpp on this kind of machine): ~110M 68 / 151 tok/s (f32 / bf16); 1.1B
15-20 / 27 / 45 (bf16 / q8_0 / q4_0). Skipped, saying so, where llama-cpp-python is not installed.
"""

from __future__ import annotations

import os

from benchmarks.common import CACHE, print_table, random_checkpoint, run_child

ROUNDS = int(os.environ.get("LLMASOS_BENCH_ROUNDS", "3"))

CHILD = r"""
import json, statistics, time, torch
torch.set_num_threads(2)
import llama_cpp
from llmasos import LLM, SamplingParams
PATH, GGUF, DTYPE, QUANT, ROUNDS, NEW = {path!r}, {gguf!r}, getattr(torch, {dtype!r}), {quant!r}, {rounds}, {new}
prompt = [(i * 7919) % 31000 + 100 for i in range(32)]
ours = LLM.load(PATH, dtype=DTYPE, quantize=QUANT, max_batch_size=1)
theirs = llama_cpp.Llama(model_path=GGUF, n_ctx=256, n_batch=64, n_threads=2, n_threads_batch=2, verbose=False)
def ours_decode():
    out = ours.generate([prompt], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))[0]
    return (NEW - 1) / (out.finished_at - out.first_token_at)
def theirs_decode():
    stamps = []
    for token in theirs.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == NEW:
            break
    return (NEW - 1) / (stamps[-1] - stamps[0])
ours_decode(); theirs_decode()  # warm-up
rounds = {{"ours": [], "llama.cpp": []}}
for _ in range(ROUNDS):
    rounds["ours"].append(ours_decode())
    rounds["llama.cpp"].append(theirs_decode())
print(json.dumps({{k: statistics.median(v) for k, v in rounds.items()}}))
"""

CASES = [  # (label, shape, our dtype, our quantization, GGUF type)
    ("~110M fp32 vs llama.cpp f32", "small", "float32", None, "f32"),
    ("~110M bf16 vs llama.cpp bf16", "small", "bfloat16", None, "bf16"),
    ("1.1B bf16 vs llama.cpp bf16", "tinyllama-1.1b", "bfloat16", None, "bf16"),
    ("1.1B int8 vs llama.cpp q8_0", "tinyllama-1.1b", "bfloat16", "int8", "q8_0"),
    ("1.1B int4 vs llama.cpp q4_0", "tinyllama-1.1b", "bfloat16", "int4", "q4_0"),
]


def gguf_of(shape: str, gguf_type: str) -> str:
    from llmasos.checkpoints.export import export_gguf

    out = CACHE / f"{shape}-{gguf_type}.gguf"
    if not out.exists():
        export_gguf(random_checkpoint(shape, "bfloat16"), out, gguf_type, progress=False)
    return str(out)


def main() -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(
            "llama.cpp comparison skipped: llama-cpp-python is not installed "
            "(pip install 'llmasos[llamacpp]'; it compiles llama.cpp, ~15 min on 2 cores)"
        )
        return {}
    rows = []
    for label, shape, dtype, quant, gguf_type in CASES:
        new = 64 if shape == "small" else 32
        r = run_child(
            CHILD.format(
                path=str(random_checkpoint(shape, "bfloat16")),
                gguf=gguf_of(shape, gguf_type),
                dtype=dtype,
                quant=quant,
                rounds=ROUNDS,
                new=new,
            )
        )
        rows.append([label, f"{r['ours']:.1f}", f"{r['llama.cpp']:.1f}", f"{r['ours'] / r['llama.cpp']:.2f}x"])
    print_table(
        f"Decode tok/s at batch 1 against llama.cpp, same weights (median of {ROUNDS} alternating rounds)",
        ["figure", "ours", "llama.cpp", "ratio"],
        rows,
    )
    return {"rows": rows}


if __name__ == "__main__":
    main()
