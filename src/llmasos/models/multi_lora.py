"""Many LoRA adapters over one base model at once, unmerged: each row of a batch picks its own.

`read_adapter_for` reads a PEFT LoRA adapter dir (what `llmasos finetune --method lora` writes) and checks it
against the model, naming the file at fault. `AdapterSet` holds the adapters loaded on a model: it swaps each
projection that one of them targets for a `MultiLoRALinear`, which keeps the base layer and, per adapter, its
`lora_A` and `lora_B` (scale folded in) stacked into one tensor each, slot 0 left empty for "no adapter".

A forward pass is told which adapter each batch row uses (`use_adapters`), as vLLM's multi-LoRA, LoRAX and
punica's BGMV are: the adapters the batch uses are gathered from the stacks by their slot index, every row is
projected down through all of them in one product, a mask keeps each row's own adapter's rank only (the
others' terms are exact zeros), and one product projects back up. Rows without an adapter get the base
layer's output unchanged; a batch without any skips the LoRA products altogether. With no adapter loaded
the model holds its own modules again, so the fused decode kernels (`models/fast.py`) run as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llmasos.errors import CheckpointError, LLMasOSError
from llmasos.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LINEAR_NAMES
from llmasos.models.swap import swap_modules

PEFT_PREFIX = "base_model.model."
# adapter_config.json keys whose non-default values change what the adapter computes, and what we need them to be.
UNSUPPORTED = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
}


@dataclass(eq=False)
class Adapter:
    """One adapter's weights, checked against the base model: per module, (A [r, in], B [out, r]) in fp32."""

    name: str
    path: Path
    rank: int
    scale: float
    weights: dict[str, tuple[Tensor, Tensor]]
    slot: int = 0  # its place in the stacks, from 1 (set by AdapterSet)
    retired: bool = False  # unloaded: no new request may use it (requests already using it finish)

    @property
    def targets(self) -> list[str]:
        return sorted({name.rpartition(".")[2] for name in self.weights})


def projections(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection an adapter may target, by name (`model.layers.0.self_attn.q_proj`)."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in LINEAR_NAMES and hasattr(module, "in_features")
    }


def read_adapter_for(model: nn.Module | dict[str, tuple[int, int]], name: str, path: Path | str) -> Adapter:
    """Read the PEFT LoRA adapter dir `path` and check it fits `model` (or its `projections`); any fault is a
    `CheckpointError` naming the file (a missing file, a setting we do not compute, a module the model lacks, a
    shape it does not take)."""
    shapes = model if isinstance(model, dict) else projections(model)
    try:
        path = Path(path).expanduser()
        found = path.is_dir()
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, an unknown ~user
        raise CheckpointError(f"{str(path)[:200]!r}: not a usable path ({e})") from None
    if not found:
        raise CheckpointError(f"{path}: no such directory (a LoRA adapter is a dir with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    config = _read_config(config_file)
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{config_file}: r is {rank!r}; expected a positive integer (the adapter's rank)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{config_file}: lora_alpha is {alpha!r}; expected a number")
    targets = config.get("target_modules")
    listed = [targets] if isinstance(targets, str) else targets
    if not isinstance(listed, list) or not all(isinstance(t, str) for t in listed):
        raise CheckpointError(f"{config_file}: target_modules is {targets!r}; expected a list of module names")
    known = set(LINEAR_NAMES) | {"all-linear"}
    unknown = [t for t in listed if t not in known]
    if unknown and not isinstance(targets, str):  # a single string may be a regex over full names, as in PEFT
        raise CheckpointError(
            f"{config_file}: unknown target module {unknown[0]!r}; a LLaMA's projections are {', '.join(LINEAR_NAMES)}"
        )
    weights = _read_weights(weights_file)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in weights.items():
        short = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        module, dot, part = short.rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{weights_file}: unexpected tensor {key} (a LoRA adapter holds lora_A and lora_B weights)")
        if module not in shapes:
            raise CheckpointError(
                f"{weights_file}: tensor {key} targets {module}, which is not a projection of this model "
                f"(unknown target module; a LLaMA's projections are {', '.join(LINEAR_NAMES)})"
            )
        pairs.setdefault(module, {})[part[0]] = tensor
    if not pairs:
        raise CheckpointError(f"{weights_file}: no LoRA weights in it")
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise CheckpointError(f"{weights_file}: {module} has no {missing} weight")
        (a, b), (n_in, n_out) = (pair["A"], pair["B"]), shapes[module]
        if tuple(a.shape) != (rank, n_in) or tuple(b.shape) != (n_out, rank):
            raise CheckpointError(
                f"{weights_file}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; with r={rank} the base "
                f"model's {module} ({n_in} in, {n_out} out) needs lora_A [{rank}, {n_in}] and lora_B [{n_out}, {rank}] "
                "(an adapter for another base model?)"
            )
        if not (a.isfinite().all() and b.isfinite().all()):
            raise CheckpointError(f"{weights_file}: {module}'s weights hold NaN or infinite values")
        out[module] = (a.float(), b.float())
    return Adapter(name, path, rank, float(alpha) / rank, out)


def _read_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file (a LoRA adapter dir has {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type is {config['peft_type']!r}; only LORA adapters are served")
    for key, allowed in UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise CheckpointError(f"{file}: {key}={config[key]!r} is not supported (plain LoRA only)")
    return config


def _read_weights(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        bin_file = (file.parent / "adapter_model.bin").exists()
        other = " (adapter_model.bin is not read: save the adapter with safe_serialization)" if bin_file else ""
        raise CheckpointError(f"{file}: no such file{other}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


@dataclass
class _Selection:
    """The adapters of one forward pass: the slots it uses and, when rows differ, which rank columns each row keeps."""

    slots: Tensor  # [k] slot indices
    first: int  # slots[0], for the one-adapter case (a view of the stacks, no gather)
    used: frozenset[int]
    mask: Tensor | None  # [B, 1, k * rank]: 1 where a column belongs to the row's adapter; None: all rows use slots[0]


class MultiLoRALinear(nn.Module):
    """A projection with every loaded adapter's update beside it: `base(x)` plus, for each row, its adapter's
    `B @ A x * scale`. A: [slots, rank, in], Bt: [slots, rank, out] (B transposed, scale folded in)."""

    def __init__(self, base: nn.Module, adapters: AdapterSet):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = adapters  # not a module: a plain attribute
        self.A: Tensor | None = None
        self.Bt: Tensor | None = None
        self.present: frozenset[int] = frozenset()  # slots whose adapter targets this module

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        batch = self.adapters.selection
        if batch is None or self.A is None or not (batch.used & self.present):
            return y
        if batch.mask is None:
            a, bt = self.A[batch.first], self.Bt[batch.first]  # views: one adapter for every row
        else:
            if batch.mask.shape[0] != x.shape[0]:
                raise LLMasOSError(f"adapters were selected for {batch.mask.shape[0]} rows; the batch has {x.shape[0]}")
            a, bt = self.A[batch.slots].flatten(0, 1), self.Bt[batch.slots].flatten(0, 1)  # [k * rank, in|out]
        h = x.to(a.dtype) @ a.T  # [B, S, k * rank]
        if batch.mask is not None:
            h = h * batch.mask  # each row keeps its own adapter's columns
        return y + (h @ bt).to(y.dtype)


class AdapterSet:
    """The adapters loaded on one model (`AdapterSet.of(model)`), by name; changed only between forward passes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.named: dict[str, Adapter] = {}
        self.stacked: list[Adapter] = []  # in slot order, from slot 1; retired ones stay while requests use them
        self.modules: dict[str, MultiLoRALinear] = {}
        self.rank = 0
        self.selection: _Selection | None = None
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        self.dtype = getattr(model, "activation_dtype", None) or (weight.dtype if weight.is_floating_point() else torch.float32)

    @classmethod
    def of(cls, model: nn.Module) -> AdapterSet:
        found = model.__dict__.get("lora_adapters")
        if found is None:
            found = cls(model)
            model.__dict__["lora_adapters"] = found
        return found

    def get(self, name: str) -> Adapter | None:
        return self.named.get(name)

    def add(self, adapter: Adapter) -> None:
        if adapter.name in self.named:
            raise LLMasOSError(f"an adapter named {adapter.name!r} is already loaded")
        self.named[adapter.name] = adapter
        self.stacked.append(adapter)
        self._restack()

    def retire(self, name: str) -> Adapter:
        """Take `name` off the list: no new request may use it; `collect` frees it once none does."""
        adapter = self.named.pop(name, None)
        if adapter is None:
            raise LLMasOSError(f"no adapter named {name!r} is loaded")
        adapter.retired = True
        return adapter

    def collect(self, in_use: set[Adapter]) -> None:
        """Free the retired adapters no request uses any more (the model's own modules return with the last one)."""
        keep = [a for a in self.stacked if not a.retired or a in in_use]
        if len(keep) != len(self.stacked):
            self.stacked = keep
            self._restack()

    def select(self, adapters: list[Adapter | None]) -> None:
        """The adapter of each row of the next forward pass (None: the base model)."""
        slots = [a.slot if a is not None else 0 for a in adapters]
        used = sorted(set(slots) - {0})
        if not used:
            self.selection = None
            return
        index = torch.tensor(used, device=self.device)
        mask = None
        if len(used) > 1 or 0 in slots:
            rows = torch.tensor(slots)[:, None] == torch.tensor(used)[None, :]  # [B, k]
            mask = rows.repeat_interleave(self.rank, dim=1)[:, None, :].to(self.device, self.dtype)
        self.selection = _Selection(index, used[0], frozenset(used), mask)

    def _restack(self) -> None:
        """Wrap the targeted projections (unwrap the others) and rebuild every stack, slots in `stacked` order."""
        for i, adapter in enumerate(self.stacked):
            adapter.slot = i + 1
        targets = {m for a in self.stacked for m in a.weights}

        def swap(name: str, module: nn.Module) -> nn.Module | None:
            if isinstance(module, MultiLoRALinear):
                return None if name in targets else module.base
            if name in targets:
                return MultiLoRALinear(module, self)
            return None

        swap_modules(self.model, swap)
        self.modules = {n: m for n, m in self.model.named_modules() if isinstance(m, MultiLoRALinear)}
        self.rank = max((a.rank for a in self.stacked), default=0)
        slots = len(self.stacked) + 1
        for name, module in self.modules.items():
            a = torch.zeros(slots, self.rank, module.in_features)
            bt = torch.zeros(slots, self.rank, module.out_features)
            present = set()
            for adapter in self.stacked:
                if name in adapter.weights:
                    down, up = adapter.weights[name]
                    a[adapter.slot, : adapter.rank] = down
                    bt[adapter.slot, : adapter.rank] = (up * adapter.scale).T
                    present.add(adapter.slot)
            module.A, module.Bt = a.to(self.device, self.dtype), bt.to(self.device, self.dtype)
            module.present = frozenset(present)
        self.selection = None


class use_adapters:  # noqa: N801  (a context manager: `with use_adapters(model, rows):`)
    """`with use_adapters(model, [an Adapter or None per batch row]):` around a forward pass; for a model without
    adapters loaded it does nothing."""

    def __init__(self, model: nn.Module, adapters: list[Adapter | None]):
        found = model.__dict__.get("lora_adapters")
        self.set = found if found is not None and found.stacked else None
        self.adapters = adapters

    def __enter__(self) -> None:
        if self.set is not None:
            self.set.select(self.adapters)

    def __exit__(self, *exc) -> None:
        if self.set is not None:
            self.set.selection = None
