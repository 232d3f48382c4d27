"""The training loop: one loop for pretraining and fine-tuning (full, LoRA, QLoRA), on one process
or many under torchrun (DDP or FSDP2).

Exact resume: the batches of step s are a pure function of (seed, s), so a run resumed from a
checkpoint (weights, optimizer, step, RNG state) sees the same data and takes the same steps as one
never interrupted. Checkpoints are written to a temporary dir and renamed, so a kill at any moment
leaves the last one loadable. Under torchrun each rank takes its share of a step's micro-batches and
the loss is normalised by the target tokens of the whole global batch, so N processes follow the
single-process loss curve.

What a step minimises is the job's objective: the next-token cross-entropy of the labelled tokens,
or DPO's preference loss over (chosen, rejected) pairs (`llmasos.training.dpo`); either way a sum
over the micro-batch, normalised by the units of the whole global batch (tokens or pairs).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmasos.checkpoints.hf import save_model
from llmasos.checkpoints.load import build_meta_model
from llmasos.data.prepare import PackedData
from llmasos.errors import ConfigError, LLMasOSError
from llmasos.models.config import ModelConfig
from llmasos.models.llama import Transformer
from llmasos.models.zoo import zoo_config
from llmasos.outputs import atomic_dir, check_output, mark, remove
from llmasos.progress import progress_bar
from llmasos.training import distributed
from llmasos.training.config import TrainConfig

CHECKPOINTS = "checkpoints"
METRICS = "step,loss,lr,tokens_per_s,val_loss,val_ppl"  # then the objective's own columns
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")  # plotted where logged


def build_model_config(config: TrainConfig, data_meta: dict):
    """The ModelConfig: a zoo shape or a mapping, with the vocabulary and special ids of the prepared data."""
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


def loss_sum(model, x: Tensor, y: Tensor, precision: str) -> tuple[Tensor, int]:
    """Summed cross-entropy over the labelled tokens (label -100 is not trained), and their count."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"), int((y != -100).sum())


@torch.no_grad()
def mean_loss(model, batches: list[tuple[Tensor, Tensor]], precision: str) -> float:
    """Mean per-token loss of each batch, averaged; the model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        total, count = loss_sum(model, x, y, precision)
        losses.append(total.item() / max(1, count))
    model.train(was_training)
    return sum(losses) / len(losses)


def evaluate(model, data, config: TrainConfig) -> float:
    """Validation loss of a model on `eval_batches` fixed windows of prepared data."""
    return mean_loss(model, [batch_at(data, config, i, 0, split_seed=1) for i in range(config.eval_batches)], config.precision)


class CrossEntropy:
    """The objective of pretraining and instruction tuning: the summed cross-entropy of the labelled tokens
    of (inputs, labels) micro-batches, normalised by the labelled tokens of the global batch."""

    columns: tuple[str, ...] = ()  # metrics of each step, logged beside the loss
    val_columns: tuple[str, ...] = ()  # metrics of each validation
    perplexity = True  # the validation loss is a cross-entropy: its exp is logged too

    def count(self, batch: tuple[Tensor, Tensor]) -> int:
        """The units the loss of a step is averaged over: here, labelled tokens."""
        return int((batch[1] != -100).sum())

    def tokens(self, batch: tuple[Tensor, Tensor]) -> int:
        """The trained tokens of a micro-batch, for tokens/s."""
        return int((batch[1] != -100).sum())

    def loss(self, model, batch: tuple[Tensor, Tensor], device: torch.device, precision: str) -> tuple[Tensor, dict[str, float]]:
        """The summed loss of a micro-batch (to backpropagate) and the summed metrics of `columns`."""
        x, y = batch
        return loss_sum(model, x.to(device), y.to(device), precision)[0], {}

    def validate(self, model, batches: list, device: torch.device, precision: str) -> tuple[float, dict[str, float]]:
        """The validation loss and metrics."""
        return mean_loss(model, [(x.to(device), y.to(device)) for x, y in batches], precision), {}


@dataclass(frozen=True)
class Run:
    """A finished training run: its dir (`final/`, `adapter/`, metrics, checkpoints) and the optimizer steps
    it trained in all."""

    dir: Path
    steps: int


@dataclass
class Job:
    """What a run trains and on what; `train` is the same loop for every kind of job."""

    model: nn.Module  # fp32 master weights on the device, not yet wrapped for DDP/FSDP
    batch: Callable[[int, int], Any]  # (step, micro-batch of the global batch) -> a batch the objective takes
    val_batches: Callable[[], list[Any]] | None  # the fixed validation set, if any
    save_final: Callable[[dict[str, Tensor], Path], None]  # rank 0: write the result from the full weights
    trainable_only: bool = False  # checkpoints hold only trained weights (LoRA: the base stays as loaded)
    objective: Any = field(default_factory=CrossEntropy)  # CrossEntropy, or dpo.DPO for preference pairs


def save_checkpoint(run: Path, state: dict[str, Tensor], optimizer_state: dict, step: int, keep: int) -> Path:
    final = run / CHECKPOINTS / f"step-{step:07d}"
    with atomic_dir(final, replace=True) as tmp:
        save_file(state, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer_state, "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
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
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if not train and not val:  # stopped before its first step
        return None
    rewards = [k for k in REWARDS if rows and rows[0].get(k)]  # a DPO run: its rewards in a second panel
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("DPO loss" if rewards else "cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        ax = axes[0][1]
        for k in rewards:
            points = [(int(r["step"]), float(r[k])) for r in rows if r.get(k)]
            ax.plot(*zip(*points), label=k, **({"linestyle": "--"} if k == "rewards/accuracies" else {}))
        ax.set_xlabel("step")
        ax.set_ylabel("reward (beta x log-ratio to the reference)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=120)
    plt.close(fig)
    return run / "loss.png"


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, decaying matrices only (not norms or biases). The fused kernel (one pass over each
    tensor for all of Adam's updates) where the parameters are plain tensors, i.e. not FSDP's DTensors."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
        fused=fused,
    )


def _weights_to_save(model: nn.Module, trainable_only: bool) -> set[str]:
    """Names a checkpoint holds: the trained weights, or all of them but a tied LM head."""
    if trainable_only:
        return {n for n, p in model.named_parameters() if p.requires_grad}
    names = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        names.discard("lm_head.weight")
    return names


def claim_run(
    config: TrainConfig, cluster: distributed.Cluster, command: str, inputs: Iterable[Path | str | None], force: bool
) -> None:
    """Before any heavy work, refuse a run dir that is or contains an input, or (unless force) holds what
    `llmasos COMMAND` did not write or an earlier run's checkpoints; then rank 0 marks it as this run's,
    with force after clearing what was there."""
    run, owner = Path(config.out), f"llmasos {command}"
    check_output(run, inputs, force, owner)
    if not force and latest_checkpoint(run) is not None:
        raise LLMasOSError(
            f"{run} already holds checkpoints: resume it with --resume {run}, choose another --out, "
            f"or pass --force to start it over"
        )
    distributed.all_sum(0, cluster)  # every rank has looked before rank 0 changes anything
    if cluster.main:
        if force and (run.exists() or run.is_symlink()):
            remove(run)
        mark(run, owner)


def train(
    config: TrainConfig, job: Job, cluster: distributed.Cluster, resume: bool, progress: bool, command: str = "pretrain"
) -> Run:
    """The loop: every rank runs it; rank 0 alone writes files."""
    run = Path(config.out)
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:  # killed before its first checkpoint: its config is all there is to go on
        if not (run / "config.yaml").exists():
            raise LLMasOSError(f"{run}: nothing to resume (no checkpoint and no config.yaml)")
        if cluster.main:
            print(f"no checkpoint in {run} yet: starting it over from step 0", file=sys.stderr)
        resume = False
    per_step = config.micro_batch_size * cluster.world
    if config.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size {config.global_batch_size} is not a multiple of micro_batch_size "
            f"{config.micro_batch_size} x {cluster.world} processes"
        )
    accumulation = config.global_batch_size // per_step
    model = job.model
    saved_names = _weights_to_save(model, job.trainable_only)
    if config.activation_checkpointing:
        model.enable_activation_checkpointing()
    model.train()
    wrapped = distributed.wrap(model, config.strategy, cluster)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config, fused=config.strategy != "fsdp" or cluster.world == 1)
    start = 0
    if ckpt is not None:
        state = load_file(str(ckpt / "model.safetensors"))
        if set(state) != saved_names:
            raise LLMasOSError(
                f"{ckpt}: its weights do not fit this model (missing "
                f"{sorted(saved_names - set(state))[:3]}, unexpected {sorted(set(state) - saved_names)[:3]})"
            )
        saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
        distributed.load_full_state(wrapped, optimizer, state, saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        start = json.loads((ckpt / "trainer.json").read_text())["step"]

    def checkpoint(step: int) -> None:
        state = distributed.full_state(wrapped, job.trainable_only, cluster)
        optimizer_state = distributed.full_optimizer_state(wrapped, optimizer, cluster)
        if cluster.main:
            save_checkpoint(
                run, {k: v for k, v in state.items() if k in saved_names}, optimizer_state, step, config.keep_checkpoints
            )

    objective = job.objective
    metrics_file, board, bar = run / "metrics.csv", None, None
    if cluster.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if not resume or not metrics_file.exists():
            metrics_file.write_text(",".join((METRICS, *objective.columns, *objective.val_columns)) + "\n")
        else:  # drop rows logged after the checkpoint we resume from: they will be logged again
            rows = metrics_file.read_text().splitlines()
            metrics_file.write_text("\n".join([rows[0]] + [r for r in rows[1:] if int(r.split(",")[0]) <= start]) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(run / "tensorboard"), purge_step=start + 1 if resume else None)
        if progress:
            bar = progress_bar(total=config.total_steps, initial=start, desc=command, unit="step")
    val_batches = job.val_batches() if job.val_batches is not None else []
    total, step = config.total_steps, start
    try:
        while step < total:
            t0 = time.perf_counter()
            lr = lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            first = cluster.rank * accumulation
            micro_batches = [job.batch(step, first + m) for m in range(accumulation)]
            local_units = sum(objective.count(b) for b in micro_batches)
            local_tokens = sum(objective.tokens(b) for b in micro_batches)
            # Gradients are averaged over ranks, so scaling by world/targets gives the global per-unit mean
            # (per token for cross-entropy, per pair for DPO).
            units, tokens = distributed.all_sums([local_units, local_tokens], cluster)
            targets = max(1.0, units)
            loss_total, sums = 0.0, dict.fromkeys(objective.columns, 0.0)
            for m, b in enumerate(micro_batches):
                with distributed.no_sync(wrapped, last_micro=m == accumulation - 1):
                    summed, stats = objective.loss(wrapped, b, cluster.device, config.precision)
                    (summed * (cluster.world / targets)).backward()
                loss_total += summed.item()
                for k, v in stats.items():
                    sums[k] += v
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss, *summed_stats = distributed.all_sums([loss_total, *sums.values()], cluster)
            loss /= targets
            stats = {k: v / targets for k, v in zip(sums, summed_stats)}
            rate = tokens / (time.perf_counter() - t0)
            val_loss, val_stats = None, {}
            if val_batches and (step % config.eval_every == 0 or step == total):
                val_loss, val_stats = objective.validate(wrapped, val_batches, cluster.device, config.precision)
            if cluster.main:
                _log(board, metrics_file, config, objective, step, total, loss, lr, rate, val_loss, stats, val_stats)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}", refresh=False)
                    bar.update(1)
            if step % config.checkpoint_every == 0 or step == total:
                checkpoint(step)
    except KeyboardInterrupt:
        if step > start:
            checkpoint(step)
        raise LLMasOSError(f"interrupted at step {step}; continue with `llmasos {command} --resume {run}`") from None
    finally:
        if board is not None:
            board.close()
        if bar is not None:
            bar.close()
        if cluster.main and metrics_file.exists():
            plot_losses(run)
    model.eval()
    state = distributed.full_state(wrapped, False, cluster)
    if cluster.main:
        job.save_final(state, run)
    return Run(run, total)


def _log(
    board,
    metrics_file: Path,
    config: TrainConfig,
    objective,
    step: int,
    total: int,
    loss: float,
    lr: float,
    rate: float,
    val_loss: float | None,
    stats: dict[str, float],
    val_stats: dict[str, float],
) -> None:
    """A step's scalars to TensorBoard (every step) and metrics.csv (every log_every steps, validations and the last)."""
    board.add_scalar("train/loss", loss, step)
    board.add_scalar("train/lr", lr, step)
    board.add_scalar("train/tokens_per_s", rate, step)
    for k, v in stats.items():
        board.add_scalar(f"train/{k}", v, step)
    ppl = math.exp(min(val_loss, 700.0)) if val_loss is not None and objective.perplexity else None
    if val_loss is not None:
        board.add_scalar("val/loss", val_loss, step)
        if ppl is not None:
            board.add_scalar("val/perplexity", ppl, step)
        for k, v in val_stats.items():
            board.add_scalar(f"val/{k.removeprefix('val_')}", v, step)
    if step % config.log_every == 0 or val_loss is not None or step == total:
        values = {**stats, **val_stats}
        extra = "".join(
            f",{'' if values.get(k) is None else f'{values[k]:.6f}'}" for k in (*objective.columns, *objective.val_columns)
        )
        with open(metrics_file, "a") as f:
            f.write(
                f"{step},{loss:.6f},{lr:.6g},{rate:.1f},"
                f"{'' if val_loss is None else f'{val_loss:.6f}'},"
                f"{'' if ppl is None else f'{ppl:.4f}'}{extra}\n"
            )


def save_full_model(config, tokenizer_dir: Path | None) -> Callable[[dict[str, Tensor], Path], None]:
    """`Job.save_final` for a whole model: `run/final` as an HF dir with the tokenizer."""

    def save(state: dict[str, Tensor], run: Path) -> None:
        model = build_meta_model(config)
        model.load_state_dict(state, assign=True, strict=False)
        model.tie_weights()
        with atomic_dir(run / "final", replace=True) as tmp:
            save_model(model, tmp, tokenizer_dir=tokenizer_dir)

    return save


def packed_job(
    model: nn.Module,
    config: TrainConfig,
    data_dir: Path,
    device: torch.device,
    save_final: Callable[[dict[str, Tensor], Path], None],
    trainable_only: bool = False,
) -> Job:
    """Training on prepared shards: random windows of seq_len + 1 tokens."""
    train_data, val_data = PackedData(data_dir, "train"), PackedData(data_dir, "val")
    has_val = len(val_data) > config.seq_len + 1
    return Job(
        model.to(device),
        lambda step, micro: batch_at(train_data, config, step, micro),
        (lambda: [batch_at(val_data, config, i, 0, split_seed=1) for i in range(config.eval_batches)]) if has_val else None,
        save_final,
        trainable_only,
    )


def pretrain(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
    inputs: Iterable[Path | str | None] = (),
) -> Run:
    """Train a new model on prepared data; returns the run, whose dir's `final/` is an HF model dir.

    A new run's dir (`out`) may be one `llmasos pretrain` wrote without checkpoints, anything else only with
    `force` (which clears it); never the data or `inputs` (say, the YAML the config came from)."""
    if not config.data:
        raise ConfigError("data: the prepared data dir (`llmasos prepare ... --out DIR`) is required")
    cluster = distributed.init_cluster()
    try:
        model_config = build_model_config(config, PackedData(config.data, "train").metadata)
        if not resume:
            claim_run(config, cluster, "pretrain", [config.data, *inputs], force)
        torch.manual_seed(config.seed)
        model = Transformer(model_config)
        model.init_weights(generator=torch.Generator().manual_seed(config.seed))
        tokenizer_dir = Path(config.data) / "tokenizer"
        job = packed_job(
            model,
            config,
            Path(config.data),
            cluster.device,
            save_full_model(model_config, tokenizer_dir if tokenizer_dir.exists() else None),
        )
        return train(config, job, cluster, resume, progress)
    finally:
        distributed.close_cluster(cluster)
