"""Scale-out under `torchrun`: DDP or FSDP2 (`fully_shard`), and whole-model state for checkpoints.

Checkpoints always hold full (unsharded) tensors under the model's own names, gathered with
`torch.distributed.checkpoint.state_dict`, so a run saved by 2 FSDP processes resumes on 1 process,
under DDP, or on 4, and the final model is an ordinary HF dir. Every rank reads a checkpoint itself
(processes of one job share a filesystem, or each node holds a copy of the run dir).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from llmasos.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_cluster() -> Cluster:
    """The process group when launched by torchrun (gloo on CPUs, NCCL on GPUs), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Cluster(device=device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Cluster(dist.get_rank(), dist.get_world_size(), device)


def close_cluster(cluster: Cluster) -> None:
    if cluster.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, cluster: Cluster) -> nn.Module:
    """The model as the training step calls it: itself on one process, else DDP or FSDP2 around it."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if cluster.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[cluster.device.index] if cluster.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def no_sync(wrapped: nn.Module, last_micro: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return nullcontext() if last_micro else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last_micro)
    return nullcontext()


def all_sum(value: float | int, cluster: Cluster) -> float:
    if cluster.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=cluster.device)
    dist.all_reduce(t)
    return t.item()


def all_sums(values: list[float], cluster: Cluster) -> list[float]:
    """Each value summed over ranks, in one collective."""
    if cluster.world == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=cluster.device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor, cluster: Cluster) -> torch.Tensor:
    """A tensor summed over ranks (in place; returned)."""
    if cluster.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _options(full: bool, trainable_only: bool, cpu_offload: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload, ignore_frozen_params=trainable_only, strict=False)


def full_state(wrapped: nn.Module, trainable_only: bool, cluster: Cluster) -> dict[str, torch.Tensor]:
    """Unsharded weights under the model's names (a collective: every rank calls it; rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(wrapped, options=_options(True, trainable_only, cpu_offload=cluster.world > 1))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def full_optimizer_state(wrapped: nn.Module, optimizer, cluster: Cluster) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer, options=_options(True, False, cpu_offload=cluster.world > 1))


def load_full_state(wrapped: nn.Module, optimizer, state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load full tensors into a model of any strategy (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(wrapped, state, options=_options(True, False))
    set_optimizer_state_dict(wrapped, optimizer, optimizer_state, options=_options(True, False))
