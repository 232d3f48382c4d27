"""Peak memory to load the tinyllama-1.1b shape in bf16 and read every weight once: ours against transformers.

Target (issue: foundation): our peak RSS increase <= 1.3x the weight bytes.
"""

from __future__ import annotations

from benchmarks.common import print_table, random_checkpoint, run_child

MEASURE = """
import json, resource, time, torch
torch.set_num_threads(2)
import psutil
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
{load}
with torch.no_grad():  # read every weight once, as the first forward does (memory-mapped pages become resident)
    for p in model.parameters():
        p.view(-1).float().sum()
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(weights=weights, peak_increase=peak - base, seconds=seconds)))
"""
OURS = "from llmasos.checkpoints.load import load_model\nmodel = load_model(PATH, dtype=torch.bfloat16)"
HF = "import transformers\nmodel = transformers.AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.bfloat16)"


def main() -> dict:
    path = random_checkpoint("tinyllama-1.1b", "bfloat16")
    results = {}
    for name, load in (("llmasos", OURS), ("transformers", HF)):
        results[name] = run_child(MEASURE.format(load=load.replace("PATH", repr(str(path)))))
    rows = []
    for name, r in results.items():
        ratio = r["peak_increase"] / r["weights"]
        rows.append(
            [name, f"{r['weights'] / 1e9:.2f} GB", f"{r['peak_increase'] / 1e9:.2f} GB", f"{ratio:.2f}x", f"{r['seconds']:.1f} s"]
        )
    ours = results["llmasos"]["peak_increase"] / results["llmasos"]["weights"]
    print_table(
        "Load tinyllama-1.1b shape in bf16 (load + one read of every weight; peak RSS increase / weight bytes; target <= 1.30x)",
        ["system", "weights", "peak RSS increase", "ratio", "time"],
        rows,
    )
    print(f"load memory: {ours:.2f}x weight bytes -> {'PASS' if ours <= 1.3 else 'FAIL'} (target <= 1.30x)")
    return {"load_peak_ratio": ours, "target_met": ours <= 1.3}


if __name__ == "__main__":
    main()
