"""The training loop: one loop for pretraining (and, later, fine-tuning).

Exact resume: the batches of step s are drawn from a generator seeded by (seed, s), so a run
resumed from a checkpoint (model, optimizer, step, RNG state) sees the same data and takes the
same steps as one never interrupted. Checkpoints are written to a temporary dir and renamed, so
a kill at any moment leaves the last one loadable.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmasos.errors import ConfigError, LLMasOSError
from llmasos.training.config import TrainConfig

CHECKPOINTS = "checkpoints"


def build_model_config(config: TrainConfig, data_meta: dict):
    """The ModelConfig: a zoo shape or a mapping, with the vocabulary and special ids of the prepared data."""
    from llmasos.models.config import ModelConfig
    from llmasos.models.zoo import zoo_config

    if isinstance(config.model, str):
        model_config = zoo_config(config.model)
    elif isinstance(config.model, dict):
        model_config = ModelConfig.from_dict(config.model, where="model")
    else:
        raise ConfigError(f"model: expected a zoo name or a mapping, got {config.model!r}")
    model_config.vocab_size = data_meta["vocab_size"]
    model_config.bos_token_id, model_config.eos_token_id = data_meta["bos_id"], data_meta["eos_id"]
    model_config.max_position_embeddings = max(model_config.max_position_embeddings, config.seq_len)
    return model_config


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_at(data, config: TrainConfig, step: int, micro: int, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `micro` of step `step`: random windows of seq_len + 1 tokens, a pure function of the step."""
    n = len(data) - config.seq_len - 1
    if n < 1:
        raise LLMasOSError(f"the data has {len(data)} tokens, fewer than seq_len + 1 = {config.seq_len + 1}")
    g = torch.Generator().manual_seed((config.seed * 1_000_003 + split_seed) * 1_000_003 + step * 1009 + micro)
    starts = torch.randint(0, n + 1, (config.micro_batch_size,), generator=g).tolist()
    windows = torch.stack([torch.from_numpy(data.tokens(s, config.seq_len + 1).astype("int64")) for s in starts])
    return windows[:, :-1], windows[:, 1:]


def loss_of(model, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, data, config: TrainConfig) -> float:
    """Mean validation loss over `eval_batches` fixed batches; the model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    losses = [loss_of(model, *batch_at(data, config, i, 0, split_seed=1), config.precision).item()
              for i in range(config.eval_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def save_checkpoint(run: Path, model, optimizer, step: int, keep: int) -> Path:
    from llmasos.checkpoints.store import atomic_dir
    from safetensors.torch import save_file

    final = run / CHECKPOINTS / f"step-{step:07d}"
    with atomic_dir(final, replace=True) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step}) + "\n")
    for old in sorted((run / CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    done = sorted(p for p in (run / CHECKPOINTS).glob("step-*") if (p / "trainer.json").exists())
    return done[-1] if done else None


def plot_losses(run: Path) -> Path | None:
    """The loss curve (train and validation) as a PNG beside metrics.csv."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=120)
    plt.close(fig)
    return run / "loss.png"


def pretrain(config: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train; returns the run dir, whose `final/` is an HF model dir with its tokenizer."""
    import yaml

    from llmasos.checkpoints.hf import save_model
    from llmasos.checkpoints.load import build_meta_model, materialize
    from llmasos.checkpoints.weights import read_safetensors_header
    from llmasos.data.prepare import PackedData

    run = Path(config.out)
    if not config.data:
        raise ConfigError("data: the prepared data dir (`llmasos prepare ... --out DIR`) is required")
    train_data, val_data = PackedData(config.data, "train"), PackedData(config.data, "val")
    model_config = build_model_config(config, train_data.metadata)
    torch.manual_seed(config.seed)
    start = 0
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:
        raise LLMasOSError(f"{run}: no checkpoint to resume from")
    if not resume and latest_checkpoint(run) is not None:
        raise LLMasOSError(f"{run} already holds checkpoints: resume it with --resume {run}, or choose another --out")
    if ckpt is not None:
        model = build_meta_model(model_config)
        materialize(model, read_safetensors_header(ckpt / "model.safetensors"), torch.float32, "cpu", ckpt)
        model = model.train()
        # The memory-mapped weights are copy-on-write; give the optimizer tensors of its own.
        for p in model.parameters():
            p.data = p.data.clone()
        start = json.loads((ckpt / "trainer.json").read_text())["step"]
    else:
        from llmasos.models.llama import Transformer

        model = Transformer(model_config)
        model.init_weights(generator=torch.Generator().manual_seed(config.seed))
        model.train()
    if config.activation_checkpointing:
        model.enable_activation_checkpointing()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    if ckpt is not None:
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    metrics_file = run / "metrics.csv"
    if not resume or not metrics_file.exists():
        metrics_file.write_text("step,loss,lr,tokens_per_s,val_loss,val_ppl\n")
    else:  # drop rows logged after the checkpoint we resume from: they will be logged again
        rows = metrics_file.read_text().splitlines()
        metrics_file.write_text("\n".join([rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) <= start]) + "\n")

    from torch.utils.tensorboard import SummaryWriter

    board = SummaryWriter(str(run / "tensorboard"), purge_step=start + 1 if resume else None)
    total = config.total_steps
    tokens_per_step = config.global_batch_size * config.seq_len
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="training", unit="step")
    step = start
    try:
        while step < total:
            t0 = time.perf_counter()
            lr = lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(config.accumulation):
                x, y = batch_at(train_data, config, step, micro)
                loss = loss_of(model, x, y, config.precision) / config.accumulation
                loss.backward()
                loss_sum += loss.item()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rate = tokens_per_step / (time.perf_counter() - t0)
            val_loss = None
            if len(val_data) > config.seq_len + 1 and (step % config.eval_every == 0 or step == total):
                val_loss = evaluate(model, val_data, config)
            board.add_scalar("train/loss", loss_sum, step)
            board.add_scalar("train/lr", lr, step)
            board.add_scalar("train/tokens_per_s", rate, step)
            if val_loss is not None:
                board.add_scalar("val/loss", val_loss, step)
                board.add_scalar("val/perplexity", math.exp(val_loss), step)
            if step % config.log_every == 0 or val_loss is not None or step == total:
                with open(metrics_file, "a") as f:
                    f.write(f"{step},{loss_sum:.6f},{lr:.6g},{rate:.1f},"
                            f"{'' if val_loss is None else f'{val_loss:.6f}'},"
                            f"{'' if val_loss is None else f'{math.exp(val_loss):.4f}'}\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
            if step % config.checkpoint_every == 0 or step == total:
                save_checkpoint(run, model, optimizer, step, config.keep_checkpoints)
    except KeyboardInterrupt:
        if step > start:
            save_checkpoint(run, model, optimizer, step, config.keep_checkpoints)
        raise LLMasOSError(f"interrupted at step {step}; continue with `llmasos pretrain --resume {run}`") from None
    finally:
        board.close()
        if bar is not None:
            bar.close()
        if metrics_file.exists():
            plot_losses(run)
    model.eval()
    tokenizer_dir = Path(config.data) / "tokenizer"
    from llmasos.checkpoints.store import atomic_dir

    with atomic_dir(run / "final", replace=True) as tmp:
        save_model(model, tmp, tokenizer_dir=tokenizer_dir if tokenizer_dir.exists() else None)
    return run
