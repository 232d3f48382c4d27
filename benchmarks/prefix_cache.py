"""Automatic prefix caching: time to first token of a chat's 5th turn, with and without the cache.

The ~110M shape (bf16, random weights), in the engine directly: a 560-token system prompt, then turns of a
150-token question and a 60-token answer, the whole history re-sent each turn as a chat client does (as
token ids, so that it is the same tokens). Turns 1-4 run on the caching engine; then a 5th question
(~1,550-token prompt) goes to it and to an engine over the same weights without the cache, alternately,
a new question each round. TTFT: from the request's arrival at the engine to its first token.

Target (issue 16): the 5th turn's TTFT >= 5x faster with the cache.
"""

from __future__ import annotations

import os

from benchmarks.common import print_table, random_checkpoint, run_child

ROUNDS = int(os.environ.get("LLMASOS_BENCH_ROUNDS", "3"))
SYSTEM, QUESTION, ANSWER = 560, 150, 60

CHILD = r"""
import json, statistics, torch
torch.set_num_threads(2)
from llmasos import LLM, SamplingParams
llm = LLM.load({path!r}, dtype=torch.bfloat16, max_batch_size=4)
plain = LLM(llm.model, llm.tokenizer, max_batch_size=4, enable_prefix_caching=False)
g = torch.Generator().manual_seed(0)
def words(n):
    return torch.randint(100, 31000, (n,), generator=g).tolist()
first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
history = words({system})
for turn in range(4):
    history += words({question})
    history += llm.generate([history], SamplingParams(max_tokens={answer}, temperature=0, ignore_eos=True))[0].token_ids
plain.generate([words(64)], first)  # warm-up
cached, uncached, hits = [], [], []
for r in range({rounds}):
    fifth = history + words({question})
    for engine, times in ((llm, cached), (plain, uncached)):
        out = engine.generate([fifth], first)[0]
        times.append(out.first_token_at - out.arrival)
        if engine is llm:
            hits.append(out.num_cached_tokens)
print(json.dumps(dict(prompt=len(fifth), hits=min(hits), cached=statistics.median(cached), uncached=statistics.median(uncached))))
"""


def main() -> dict:
    path = random_checkpoint("small", "bfloat16")
    r = run_child(CHILD.format(path=str(path), system=SYSTEM, question=QUESTION, answer=ANSWER, rounds=ROUNDS))
    ratio = r["uncached"] / r["cached"]
    print_table(
        f"Prefix caching: TTFT of a chat's 5th turn ({r['prompt']}-token prompt), ~110M bf16, 2 threads, median of {ROUNDS}",
        ["engine", "prompt tokens cached", "TTFT (ms)", "speed-up", "target", "verdict"],
        [
            ["without the prefix cache", "0", f"{r['uncached'] * 1e3:.0f}", "1.00x", "-", "-"],
            [
                "with the prefix cache",
                str(r["hits"]),
                f"{r['cached'] * 1e3:.0f}",
                f"{ratio:.1f}x",
                ">= 5x",
                "PASS" if ratio >= 5 else "FAIL",
            ],
        ],
    )
    return {"passed": int(ratio >= 5), "checked": 1}


if __name__ == "__main__":
    main()
