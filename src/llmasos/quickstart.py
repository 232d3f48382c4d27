"""`llmasos quickstart`: the whole life cycle on data every Python installation has.

The corpus is the running Python's own standard library (found through `sysconfig`). The steps:
train a byte-level BPE on it, prepare packed shards, pretrain a small LLaMA for a few minutes,
measure validation perplexity before and after, store the model as `quickstart-stdlib`, and
complete a Python prompt with it. A rerun reuses the tokenizer and the prepared data; an
interrupted run resumes from its last checkpoint. Its `out` dir is marked as its own (`.llmasos`): a
dir it did not write is taken only with `force`, and everything inside its own dir is its to replace.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

from rich.console import Console
from rich.table import Table

STORE_NAME = "quickstart-stdlib"
COMMAND = "llmasos quickstart"
MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
VOCAB = 4096
SEQ_LEN = 256


def stdlib_files(max_bytes: int) -> list[Path]:
    """The standard library's .py files (tests excluded), in a fixed order, up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") or p.startswith(".") for p in rel):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def run(
    minutes: float = 3.5,
    out: Path | str = "runs/quickstart",
    corpus_mb: float = 6.0,
    store: bool = True,
    console: Console | None = None,
    force: bool = False,
) -> dict:
    import torch

    from llmasos import LLM, SamplingParams
    from llmasos.checkpoints.store import pull
    from llmasos.data.prepare import PackedData, prepare
    from llmasos.data.sources import iter_documents
    from llmasos.kernels import compute_dtype
    from llmasos.outputs import check_output, mark, remove, written_by
    from llmasos.tokenization.train import train_bpe
    from llmasos.training import trainer
    from llmasos.training.config import TrainConfig

    console = console or Console()
    out = Path(out)
    files = stdlib_files(int(corpus_mb * 2**20))
    check_output(out, files, force, COMMAND)
    if force and (out.exists() or out.is_symlink()) and written_by(out) != COMMAND:
        remove(out)
    mark(out, COMMAND)
    settings = {"corpus_mb": corpus_mb, "vocab": VOCAB, "python": sysconfig.get_python_version()}
    stamp = out / "corpus.json"
    fresh = not stamp.exists() or json.loads(stamp.read_text()) != settings
    console.print(
        f"[bold]1. Corpus[/bold]: {len(files)} files of the Python {settings['python']} standard library "
        f"({sum(f.stat().st_size for f in files) / 2**20:.1f} MB) from {files[0].parent}"
    )
    if fresh or not (out / "tokenizer" / "tokenizer.json").exists():
        console.print(f"[bold]2. Tokenizer[/bold]: training a byte-level BPE of {VOCAB} tokens")
        train_bpe((d.text for d in iter_documents(files)), VOCAB, out / "tokenizer", model_max_length=SEQ_LEN * 2, force=True)
    else:
        console.print(f"[bold]2. Tokenizer[/bold]: reusing {out / 'tokenizer'}")
    if fresh or not (out / "data" / "metadata.json").exists():
        console.print("[bold]3. Data[/bold]: cleaning, deduplicating, tokenizing, packing")
        prepare(files, out / "tokenizer", out / "data", val_fraction=0.05, workers=2, force=True)
        stamp.write_text(json.dumps(settings))
    else:
        console.print(f"[bold]3. Data[/bold]: reusing {out / 'data'}")
    meta = json.loads((out / "data" / "metadata.json").read_text())
    console.print(f"   {meta['splits']['train']['tokens']:,} training and {meta['splits']['val']['tokens']:,} validation tokens")

    # bf16-mixed only where the CPU computes in bf16 (it widens to fp32 where bf16 would be emulated, and slow)
    precision = "bf16-mixed" if compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16 else "fp32"
    base = dict(
        model=MODEL,
        data=str(out / "data"),
        out=str(out / "run"),
        seq_len=SEQ_LEN,
        micro_batch_size=8,
        global_batch_size=16,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        weight_decay=0.1,
        eval_batches=8,
        precision=precision,
        seed=0,
        log_every=5,
        keep_checkpoints=1,
    )
    run_dir = out / "run"
    resume = trainer.latest_checkpoint(run_dir) is not None and not (run_dir / "final").exists()
    if resume:
        config = TrainConfig.from_yaml(run_dir / "config.yaml")
        console.print(f"[bold]4. Pretraining[/bold]: resuming the interrupted run in {run_dir}")
    else:
        # Calibrate: time a few steps of this shape here, then size the run to the budget.
        probe = TrainConfig.from_dict(
            {**base, "max_steps": 4, "out": str(out / "probe"), "eval_every": 1000, "checkpoint_every": 1000, "log_every": 1}
        )
        trainer.pretrain(probe, progress=False, force=True)
        rates = [float(r.split(",")[3]) for r in (out / "probe" / "metrics.csv").read_text().splitlines()[2:]]
        step_seconds = probe.global_batch_size * SEQ_LEN / sorted(rates)[len(rates) // 2]
        import shutil

        shutil.rmtree(out / "probe", ignore_errors=True)
        steps = max(10, int(minutes * 60 / step_seconds))
        config = TrainConfig.from_dict(
            {
                **base,
                "max_steps": steps,
                "warmup_steps": max(1, min(50, steps // 10)),
                "eval_every": max(10, steps // 5),
                "checkpoint_every": max(10, steps // 10),
            }
        )
        console.print(
            f"[bold]4. Pretraining[/bold]: {steps} steps of {config.global_batch_size} x {SEQ_LEN} tokens "
            f"(~{minutes:g} min at {step_seconds:.2f} s/step, {precision})"
        )

    val = PackedData(out / "data", "val")
    from llmasos.training.trainer import build_model_config, evaluate

    torch.manual_seed(config.seed)
    from llmasos.models.llama import Transformer

    untrained = Transformer(build_model_config(config, meta))
    untrained.init_weights(generator=torch.Generator().manual_seed(config.seed))
    before = math.exp(evaluate(untrained, val, config))
    del untrained
    trainer.pretrain(config, resume=resume, force=True)
    llm = LLM.load(run_dir / "final")
    after = math.exp(evaluate(llm.model, val, config))

    console.print("[bold]5. Evaluation[/bold]")
    table = Table(show_header=True)
    table.add_column("model")
    table.add_column("validation perplexity", justify="right")
    table.add_row("untrained (random init)", f"{before:,.1f}")
    table.add_row(f"after {config.total_steps} steps", f"{after:,.2f}")
    console.print(table)

    name = None
    if store:
        name = pull(str(run_dir / "final"), name=STORE_NAME, force=True, progress=False).name
        console.print(f"[bold]6. Stored[/bold] as {name!r}; loss curve in {run_dir / 'loss.png'}")
    prompt = "def fibonacci(n):"
    sample = llm.generate([prompt], SamplingParams(max_tokens=64, temperature=0.6, top_p=0.95, seed=0))[0].text
    console.print("[bold]7. A completion[/bold]:")
    console.print(prompt + sample, markup=False, highlight=False)
    target = name or str(run_dir / "final")
    console.print("[bold]Next[/bold]:")
    for cmd in (
        f"llmasos chat {target}",
        f"llmasos serve {target}                      # OpenAI-compatible API + chat page on :8000",
        f"llmasos eval {target} --tasks story_continuation --perplexity {out / 'data'}",
        f"llmasos export {target} --format gguf --out {target}.gguf   # for llama.cpp and Ollama",
        f"llmasos finetune {target} --data my-instructions.jsonl --method lora --out runs/ft",
        f"llmasos quickstart --minutes {max(10, int(minutes) * 3)}    # train longer: a better model",
    ):
        console.print(f"  {cmd}", markup=False, highlight=False)
    return {
        "perplexity_before": before,
        "perplexity_after": after,
        "steps": config.total_steps,
        "model": target,
        "sample": sample,
    }
