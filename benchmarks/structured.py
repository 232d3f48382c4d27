"""Structured outputs: the cost of grammar-constrained decoding, and the two libraries that could do it.

Decode tok/s of the ~110M shape (bf16, 2 threads) with every sequence constrained by a JSON Schema, against the
same requests unconstrained, at batch 1 and 16; rounds alternate and each figure is the median of its rounds.
Target (issue: serving for applications): constrained >= 0.9x unconstrained at batch 1 and at 16.

Then what chose the library (`llmasos/inference/structured.py`): compile time and per-token mask time of a few
schemas on the same 32,000-token vocabulary, one thread, for llguidance (what we use) and, when it is
installed, xgrammar (`pip install xgrammar` to see its column).
"""

from __future__ import annotations

import json
import os

from benchmarks.common import print_table, random_checkpoint, run_child

ROUNDS = int(os.environ.get("LLMASOS_BENCH_ROUNDS", "3"))
NEW = 64

# Long enough that no sequence completes its grammar within NEW tokens (at least 20 items).
DECODE_SCHEMA = {
    "type": "array",
    "minItems": 20,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "kind": {"enum": ["a", "b", "c"]},
            "value": {"type": "number"},
        },
        "required": ["name", "kind", "value"],
        "additionalProperties": False,
    },
}

# (schema, an instance): the instance is tokenized and walked through, computing the mask at each token.
LIBRARY_SCHEMAS = {
    "flat object": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested, arrays, enum, pattern": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "status": {"enum": ["active", "inactive", "banned"]},
                "score": {"type": "number", "minimum": 0, "maximum": 100},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
                "owner": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
                    "required": ["name"],
                },
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                        "required": ["sku", "qty"],
                    },
                },
            },
            "required": ["id", "status", "score", "tags", "owner", "items"],
        },
        {
            "id": "ABC-1234",
            "status": "active",
            "score": 42.5,
            "tags": ["a", "bb", "ccc"],
            "owner": {"name": "Grace", "email": "g@x.org"},
            "items": [{"sku": "x1", "qty": 2}, {"sku": "y2", "qty": 10}],
        },
    ),
    "any JSON object": ({"type": "object"}, {"a": [1, 2, {"b": None}], "c": "hello world", "d": True}),
}

DECODE_CHILD = r"""
import json, statistics, torch
torch.set_num_threads(2)
from llmasos import LLM, SamplingParams
PATH, ROUNDS, NEW, SCHEMA = {path!r}, {rounds}, {new}, json.loads({schema!r})
llm = LLM.load(PATH, dtype=torch.bfloat16, max_batch_size=16)
prompt = [(i * 7919) % 31000 + 100 for i in range(32)]
def run(batch, constrained):
    structured = {{"json": SCHEMA}} if constrained else None
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, structured=structured)
    outs = llm.generate([prompt] * batch, params)
    assert all(len(o.token_ids) == NEW for o in outs), [o.finish_reason for o in outs]
    first = max(o.first_token_at for o in outs); last = max(o.finished_at for o in outs)
    return batch * (NEW - 1) / (last - first)
run(1, True)  # builds llguidance's view of the vocabulary (once per engine)
results = {{f"{{kind}}-b{{b}}": [] for b in (1, 16) for kind in ("free", "constrained")}}
for r in range(ROUNDS):
    for b in (1, 16):
        for kind in ("free", "constrained"):
            results[f"{{kind}}-b{{b}}"].append(run(b, kind == "constrained"))
print(json.dumps({{k: statistics.median(v) for k, v in results.items()}}))
"""

LIBRARY_CHILD = r"""
import json, statistics, time, torch
torch.set_num_threads(1)
from tokenizers import Tokenizer
PATH, SCHEMAS = {path!r}, json.loads({schemas!r})
source = open(PATH + "/tokenizer.json").read()
tok = Tokenizer.from_str(source)
V = tok.get_vocab_size()
EOS = tok.token_to_id("<|end_of_text|>")
def walk(fill, consume, ids):
    times = []
    for t in ids:
        start = time.perf_counter(); fill(); times.append(time.perf_counter() - start)
        assert consume(t)
    return statistics.median(times) * 1e6, max(times) * 1e6
out = {{}}
import llguidance, llguidance.torch
from llmasos.inference.structured import JSON_OPTIONS
start = time.perf_counter()
lltok = llguidance.LLTokenizer(source, n_vocab=V, eos_token=EOS)
out["llguidance"] = {{"vocabulary_s": time.perf_counter() - start}}
for name, (schema, instance) in SCHEMAS.items():
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_ms = (time.perf_counter() - start) * 1e3
    mask = llguidance.torch.allocate_token_bitmask(1, V)
    med, worst = walk(lambda: llguidance.torch.fill_next_token_bitmask(m, mask), m.consume_token,
                      tok.encode(json.dumps(instance), add_special_tokens=False).ids)
    out["llguidance"][name] = [compile_ms, med, worst]
try:
    import xgrammar
except ImportError:
    xgrammar = None
if xgrammar is not None:
    start = time.perf_counter()
    vocab = [tok.id_to_token(i) for i in range(V)]
    info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[EOS])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    out["xgrammar"] = {{"vocabulary_s": time.perf_counter() - start}}
    for name, (schema, instance) in SCHEMAS.items():
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        compile_ms = (time.perf_counter() - start) * 1e3
        m = xgrammar.GrammarMatcher(compiled)
        mask = xgrammar.allocate_token_bitmask(1, V)
        med, worst = walk(lambda: m.fill_next_token_bitmask(mask), m.accept_token,
                          tok.encode(json.dumps(instance), add_special_tokens=False).ids)
        out["xgrammar"][name] = [compile_ms, med, worst]
print(json.dumps(out))
"""


def main() -> dict:
    path = random_checkpoint("small", "bfloat16")
    r = run_child(DECODE_CHILD.format(path=str(path), rounds=ROUNDS, new=NEW, schema=json.dumps(DECODE_SCHEMA)))
    rows, checks = [], []
    for b in (1, 16):
        ratio = r[f"constrained-b{b}"] / r[f"free-b{b}"]
        checks.append(ratio >= 0.9)
        rows.append(
            [
                f"~110M bf16 decode, batch {b}, JSON Schema",
                f"{r[f'constrained-b{b}']:.1f}",
                f"{r[f'free-b{b}']:.1f}",
                f"{ratio:.2f}x",
                "0.90x",
                "PASS" if ratio >= 0.9 else "FAIL",
            ]
        )
    print_table(
        f"Constrained decode tok/s against unconstrained (median of {ROUNDS} alternating rounds)",
        ["figure", "constrained", "free", "ratio", "target", "verdict"],
        rows,
    )
    libs = run_child(LIBRARY_CHILD.format(path=str(path), schemas=json.dumps(LIBRARY_SCHEMAS)))
    rows = []
    for lib, figures in libs.items():
        rows.append([lib, "vocabulary", f"{figures['vocabulary_s'] * 1e3:.0f} ms", "-", "-"])
        for name in LIBRARY_SCHEMAS:
            compile_ms, median_us, worst_us = figures[name]
            rows.append([lib, name, f"{compile_ms:.1f} ms", f"{median_us:.1f} us", f"{worst_us:.0f} us"])
    if "xgrammar" not in libs:
        rows.append(["xgrammar", "(not installed: pip install xgrammar to compare)", "-", "-", "-"])
    print_table(
        "Grammar libraries on the 32,000-token vocabulary, one thread (compile, then the mask at each token of an instance)",
        ["library", "schema", "compile", "mask median", "mask worst"],
        rows,
    )
    return {"passed": sum(checks), "checked": len(checks)}


if __name__ == "__main__":
    main()
