"""DPO (Direct Preference Optimization) as an objective of the one training loop.

A batch holds the chosen sequences of its pairs, then their rejected ones (prompt + completion, right-padded);
each sequence's log-probability is the sum over its completion tokens alone. With the reference's
log-probabilities r (a frozen copy of the starting model, the base with its LoRA adapters disabled, or
precomputed once per pair), the implicit rewards are beta * (log p - r) and the losses are TRL's
(`DPOTrainer`, same names and formulas; tests hold them and their gradients to it):

- `sigmoid` (DPO): -log sigmoid(beta * d), with label smoothing e: -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)
  (conservative DPO), where d = (log p_chosen - r_chosen) - (log p_rejected - r_rejected);
- `ipo`: (d' - 1 / (2 beta))^2, d' taking each log-ratio per completion token, as TRL does;
- `hinge`: max(0, 1 - beta d);
- `robust`: robust DPO, the sigmoid loss unbiased for preferences flipped with probability e.

The loss of a step is the mean over the pairs of the global batch; logged with TRL's `rewards/chosen`,
`rewards/rejected`, `rewards/accuracies` (the share of pairs whose chosen reward is higher) and
`rewards/margins`, each a mean over the same pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llmasos.data.instruct import IGNORE
from llmasos.data.preference import Pair
from llmasos.errors import ConfigError
from llmasos.training import distributed

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SMOOTHED = ("sigmoid", "robust")  # the losses label smoothing applies to


@dataclass
class PairBatch:
    """Pairs as the model takes them: the chosen sequences first, then the rejected ones."""

    inputs: Tensor  # [2B, L] token ids
    labels: Tensor  # [2B, L] the next token where it is a completion token, IGNORE elsewhere
    ref: Tensor | None = None  # [2B] precomputed reference log-probabilities (chosen, then rejected)

    def to(self, device: torch.device) -> PairBatch:
        ref = None if self.ref is None else self.ref.to(device)
        return PairBatch(self.inputs.to(device), self.labels.to(device), ref)

    @property
    def pairs(self) -> int:
        return len(self.inputs) // 2


def collate_pairs(pairs: list[Pair], seq_len: int, pad_id: int) -> PairBatch:
    """A batch of pairs right-padded to the longest sequence, each cut to seq_len + 1 tokens (its start kept)."""
    sequences = [(p.prompt + p.chosen, len(p.prompt)) for p in pairs] + [(p.prompt + p.rejected, len(p.prompt)) for p in pairs]
    length = min(seq_len + 1, max(len(ids) for ids, _ in sequences))
    x = torch.full((len(sequences), length - 1), pad_id, dtype=torch.long)
    y = torch.full((len(sequences), length - 1), IGNORE, dtype=torch.long)
    for row, (ids, start) in enumerate(sequences):
        ids = ids[:length]
        x[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[row, max(0, start - 1) : len(ids) - 1] = torch.tensor(ids[max(1, start) :])
    ref = None
    if pairs and all(p.ref is not None for p in pairs):
        ref = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32)  # type: ignore[index]
    return PairBatch(x, y, ref)


def sequence_logps(model, inputs: Tensor, labels: Tensor, precision: str) -> Tensor:
    """[rows] the summed log-probability of each row's labelled tokens; the LM head runs on those positions alone."""
    mask = labels != IGNORE
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = model(inputs, logits_mask=mask)
    token_logps = -F.cross_entropy(logits.float(), labels[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    return torch.zeros(len(inputs), dtype=token_logps.dtype, device=inputs.device).index_add(0, rows, token_logps)


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss of each pair, chosen rewards, rejected rewards); the rewards are detached. ipo needs each
    completion's token count (`chosen_tokens`, `rejected_tokens`)."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completions' token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(min=1.0)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise ConfigError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPO:
    """The loop's objective for preference pairs (`PairBatch`es): the summed DPO loss of a micro-batch, normalised
    by the pairs of the global batch. `reference(inputs, labels)` gives the reference's sequence log-probabilities
    of a batch without precomputed ones."""

    columns = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
    val_columns = ("val_rewards/accuracies", "val_rewards/margins")
    perplexity = False

    def __init__(
        self,
        beta: float,
        loss_type: str,
        label_smoothing: float,
        reference: Callable[[Tensor, Tensor], Tensor] | None,
    ):
        self.beta, self.loss_type, self.label_smoothing, self.reference = beta, loss_type, label_smoothing, reference

    def count(self, batch: PairBatch) -> int:
        return batch.pairs

    def tokens(self, batch: PairBatch) -> int:
        return int((batch.labels != IGNORE).sum())

    def pair_losses(self, model, batch: PairBatch, precision: str) -> tuple[Tensor, Tensor, Tensor]:
        """(loss of each pair, chosen rewards, rejected rewards) of a batch on the model's device."""
        logps = sequence_logps(model, batch.inputs, batch.labels, precision)
        if batch.ref is not None:
            ref = batch.ref
        elif self.reference is not None:
            with torch.no_grad():
                ref = self.reference(batch.inputs, batch.labels)
        else:
            raise ValueError("a batch without reference log-probabilities, and no reference model")
        tokens = (batch.labels != IGNORE).sum(-1).to(logps.dtype)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.to(logps.dtype).chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.loss_type,
            self.label_smoothing,
            chosen_tokens,
            rejected_tokens,
        )

    def loss(self, model, batch: PairBatch, device: torch.device, precision: str) -> tuple[Tensor, dict[str, float]]:
        losses, chosen, rejected = self.pair_losses(model, batch.to(device), precision)
        return losses.sum(), _reward_sums(chosen, rejected)

    @torch.no_grad()
    def validate(self, model, batches: list[PairBatch], device: torch.device, precision: str) -> tuple[float, dict[str, float]]:
        """The mean loss over the validation pairs, and their reward accuracy and margin."""
        was_training = model.training
        model.eval()
        total, pairs, sums = 0.0, 0, {"rewards/accuracies": 0.0, "rewards/margins": 0.0}
        for batch in batches:
            losses, chosen, rejected = self.pair_losses(model, batch.to(device), precision)
            total, pairs = total + losses.sum().item(), pairs + batch.pairs
            stats = _reward_sums(chosen, rejected)
            for k in sums:
                sums[k] += stats[k]
        model.train(was_training)
        n = max(1, pairs)
        return total / n, {f"val_{k}": v / n for k, v in sums.items()}


def _reward_sums(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    return {
        "rewards/chosen": chosen.sum().item(),
        "rewards/rejected": rejected.sum().item(),
        "rewards/accuracies": (chosen > rejected).float().sum().item(),
        "rewards/margins": (chosen - rejected).sum().item(),
    }


def precompute_reference(
    pairs: list[Pair],
    reference: Callable[[Tensor, Tensor], Tensor],
    batch_size: int,
    seq_len: int,
    pad_id: int,
    cluster: distributed.Cluster,
) -> list[Pair]:
    """The pairs with their reference log-probabilities, computed once (each rank a share, then summed)."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float32, device=cluster.device)
    with torch.no_grad():
        for start in range(cluster.rank * batch_size, len(pairs), batch_size * cluster.world):
            chunk = pairs[start : start + batch_size]
            batch = collate_pairs(chunk, seq_len, pad_id).to(cluster.device)
            logps = reference(batch.inputs, batch.labels).float()
            out[start : start + len(chunk)] = torch.stack(logps.chunk(2), dim=1)
    values = distributed.all_sum_tensor(out, cluster).tolist()
    return [dataclasses.replace(p, ref=(c, r)) for p, (c, r) in zip(pairs, values)]
