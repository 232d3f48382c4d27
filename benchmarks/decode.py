"""Decode and prefill speed against transformers, same weights, same dtype, same run, 2 threads.

Rounds alternate between systems (this machine's memory speed drifts by up to 1.5x over minutes),
and each figure is the median of its rounds. The memory bandwidth is measured here too, and each
batch-1 decode figure is shown as a fraction of its roofline (weight bytes per token / bandwidth); the
16-sequence figures, which are bound by arithmetic rather than memory, as a fraction of the fp32 matmul
peak (a 2048^3 product) measured alongside.

Targets (issue: inference engine): ~110M shape: ours >= 2x transformers in bf16, >= 1.6x in fp32;
1.1B shape: bf16 >= 1.3x, int8 >= 2.2x and int4 >= 3.5x transformers bf16; 16 concurrent sequences
>= 6x our batch 1; prefill of 512 tokens >= 0.95x transformers.
"""

from __future__ import annotations

import os

from benchmarks.common import print_table, random_checkpoint, run_child

ROUNDS = int(os.environ.get("LLMASOS_BENCH_ROUNDS", "3"))

CHILD = r"""
import json, statistics, time, torch, transformers
torch.set_num_threads(2)
from llmasos import LLM, SamplingParams
from llmasos.models.quantize import linear_weight_bytes
PATH, DTYPE, VARIANTS, ROUNDS, NEW = {path!r}, getattr(torch, {dtype!r}), {variants!r}, {rounds}, {new}
prompt = [(i * 7919) % 31000 + 100 for i in range(32)]
def bandwidth():
    a = torch.ones(2**28, dtype=torch.float32)  # 1 GB (an fp32 sum is memory-bound here; a bf16 one is not)
    a.sum(); t = time.perf_counter()
    for _ in range(5): a.sum()
    return 5 * a.numel() * 4 / (time.perf_counter() - t)
def matmul_peak():
    a = torch.randn(2048, 2048); a @ a; t = time.perf_counter()
    for _ in range(3): a @ a
    return 3 * 2 * 2048**3 / (time.perf_counter() - t)
def ours_decode(llm, batch):
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    outs = llm.generate([prompt] * batch, params)
    first = max(o.first_token_at for o in outs); last = max(o.finished_at for o in outs)
    return batch * (NEW - 1) / (last - first)
class Stamps:
    def __init__(self): self.t = []
    def put(self, value): self.t.append(time.perf_counter())
    def end(self): pass
def hf_decode(model):
    s = Stamps()
    model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, streamer=s)
    return (NEW - 1) / (s.t[-1] - s.t[1])  # put() is called once for the prompt, then per token
@torch.inference_mode()
def prefill(fn):
    ids = torch.tensor([[(i * 31) % 31000 + 100 for i in range(512)]])
    fn(ids); t = time.perf_counter(); fn(ids)
    return 512 / (time.perf_counter() - t)
systems, bytes_per_token, flops_per_token = {{}}, {{}}, {{}}
hf = None
for v in VARIANTS:
    if v == "transformers":
        hf = transformers.AutoModelForCausalLM.from_pretrained(PATH, dtype=DTYPE).eval()
        systems[v] = hf
        bytes_per_token[v] = sum(p.numel() * p.element_size() for n, p in hf.named_parameters()
                                 if "embed" not in n or hf.config.tie_word_embeddings)
    else:
        quant = None if v in ("ours", "ours-b16") else v.split("-")[1]
        llm = LLM.load(PATH, dtype=DTYPE, quantize=quant, max_batch_size=16)
        systems[v] = llm
        bytes_per_token[v] = linear_weight_bytes(llm.model)
        flops_per_token[v] = 2 * sum(m.in_features * m.out_features for m in llm.model.modules() if hasattr(m, "in_features"))
results = {{v: [] for v in VARIANTS}}
bw, peak = [], []
for r in range(ROUNDS):
    bw.append(bandwidth()); peak.append(matmul_peak())
    for v, s in systems.items():
        if v == "transformers":
            with torch.inference_mode():
                results[v].append(hf_decode(s))
        else:
            results[v].append(ours_decode(s, 16 if v == "ours-b16" else 1))
out = {{v: statistics.median(x) for v, x in results.items()}}
pre = {{}}
if "transformers" in systems and "ours" in systems:
    model = systems["ours"].model
    def ours_prefill(ids):
        cache = model.new_cache(1, 512, systems["ours"].engine.cache_dtype)
        model(ids, cache=cache, logits_at=torch.tensor([511]))
    pre = {{"ours": statistics.median(prefill(ours_prefill) for _ in range(ROUNDS)),
            "transformers": statistics.median(prefill(lambda ids: hf(ids, logits_to_keep=1)) for _ in range(ROUNDS))}}
print(json.dumps(dict(decode=out, rounds=results, bandwidth=statistics.median(bw), peak=statistics.median(peak),
                  bytes=bytes_per_token, flops=flops_per_token, prefill=pre)))
"""


def measure(shape: str, dtype: str, variants: list[str], new: int = 64) -> dict:
    path = random_checkpoint(shape, "bfloat16")
    return run_child(CHILD.format(path=str(path), dtype=dtype, variants=variants, rounds=ROUNDS, new=new))


def main() -> dict:
    rows, checks = [], []

    def add(label: str, r: dict, variant: str, base: str = "transformers", target: float | None = None, batch: int = 1) -> None:
        tps = r["decode"][variant]
        roof = r["bandwidth"] / r["bytes"][variant] if batch == 1 else r["peak"] / r["flops"][variant]
        ratio = tps / r["decode"][base] if base in r["decode"] else None
        rows.append(
            [
                label,
                f"{tps:.1f}",
                f"{r['decode'][base]:.1f}" if base in r["decode"] else "-",
                f"{ratio:.2f}x" if ratio else "-",
                f"{target:.2f}x" if target else "-",
                f"{tps / roof:.0%}" + ("" if batch == 1 else " of compute"),
                ("PASS" if ratio >= target else "FAIL") if (target and ratio) else "-",
            ]
        )
        if target and ratio:
            checks.append(ratio >= target)

    for dtype, target in (("float32", 1.6), ("bfloat16", 2.0)):
        r = measure("small", dtype, ["transformers", "ours", "ours-b16"])
        add(f"~110M {dtype} decode b1", r, "ours", target=target)
        add(f"~110M {dtype} decode, 16 sequences (vs our b1)", r, "ours-b16", base="ours", target=6.0, batch=16)
        p = r["prefill"]
        rows.append(
            [
                f"~110M {dtype} prefill 512 (tok/s)",
                f"{p['ours']:.0f}",
                f"{p['transformers']:.0f}",
                f"{p['ours'] / p['transformers']:.2f}x",
                "0.95x",
                "-",
                "PASS" if p["ours"] / p["transformers"] >= 0.95 else "FAIL",
            ]
        )
        checks.append(p["ours"] / p["transformers"] >= 0.95)
        bandwidth, peak = r["bandwidth"], r["peak"]
    r = measure("tinyllama-1.1b", "bfloat16", ["transformers", "ours", "ours-int8", "ours-int4"], new=32)
    add("1.1B bf16 decode b1", r, "ours", target=1.3)
    add("1.1B int8 decode b1 (vs transformers bf16)", r, "ours-int8", target=2.2)
    add("1.1B int4 decode b1 (vs transformers bf16)", r, "ours-int4", target=3.5)
    p = r["prefill"]
    rows.append(
        [
            "1.1B bf16 prefill 512 (tok/s)",
            f"{p['ours']:.0f}",
            f"{p['transformers']:.0f}",
            f"{p['ours'] / p['transformers']:.2f}x",
            "0.95x",
            "-",
            "PASS" if p["ours"] / p["transformers"] >= 0.95 else "FAIL",
        ]
    )
    checks.append(p["ours"] / p["transformers"] >= 0.95)
    print_table(
        f"Decode tok/s, batch 1 unless said (median of {ROUNDS} alternating rounds; memory read "
        f"{bandwidth / 1e9:.1f} GB/s and fp32 matmul peak {peak / 1e9:.0f} GFLOP/s measured in the same run)",
        ["figure", "ours", "reference", "ratio", "target", "of roofline", "verdict"],
        rows,
    )
    return {"passed": sum(checks), "checked": len(checks)}


if __name__ == "__main__":
    main()
