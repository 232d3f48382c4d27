"""LoRA: a low-rank update `B @ A` beside a frozen Linear, as a module swap.

Names and initialisation follow PEFT (`lora_A` Kaiming-uniform, `lora_B` zero, scale alpha / r), so
an adapter trained here is a PEFT adapter: `save_adapter` writes `adapter_config.json` and
`adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads onto the transformers model.
QLoRA is the same swap over a quantized base (`Int8Linear`/`Int4Linear`): the base's input
gradient is taken through its dequantized weight, so only the adapters need full precision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from llmasos.errors import CheckpointError, ConfigError
from llmasos.models.quantize import Int4Linear, Int8Linear
from llmasos.models.swap import swap_modules

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # PEFT's default for LLaMA

    def __post_init__(self) -> None:
        if self.targets in (["all-linear"], "all-linear"):
            self.targets = list(LINEAR_NAMES)
        unknown = sorted(set(self.targets) - set(LINEAR_NAMES))
        if unknown:
            raise ConfigError(
                f"lora_targets: unknown module(s) {', '.join(unknown)}; choose from {', '.join(LINEAR_NAMES)} or all-linear"
            )
        if self.rank < 1:
            raise ConfigError(f"lora_rank must be at least 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class _QuantizedBase(torch.autograd.Function):
    """y = base(x) for a frozen quantized base; the input gradient goes through the dequantized weight."""

    @staticmethod
    def forward(ctx, x: Tensor, base: nn.Module) -> Tensor:
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.base.dequantize().to(grad.dtype)
        return grad @ w, None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        self.base, self.scale = base, config.scale
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.Linear(self.in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, self.out_features, bias=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.disabled = False  # `adapters_disabled`: the base alone
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        quantized = isinstance(self.base, (Int8Linear, Int4Linear))
        y = _QuantizedBase.apply(x, self.base) if quantized and torch.is_grad_enabled() else self.base(x)
        if self.disabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def merged_weight(self) -> Tensor:
        """The base weight plus the update, in fp32 (for a quantized base, its dequantized weight)."""
        base = self.base.dequantize() if isinstance(self.base, (Int8Linear, Int4Linear)) else self.base.weight
        return base.float() + (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every weight and put a LoRA pair beside each target projection, in place."""
    model.requires_grad_(False)

    def adapted(name: str, child: nn.Module) -> nn.Module | None:
        if name.rpartition(".")[2] in config.targets and isinstance(child, (nn.Linear, Int8Linear, Int4Linear)):
            return LoRALinear(child, config).to(device=_device(child))
        return None

    return swap_modules(model, adapted)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is its base: every LoRA update is skipped (as PEFT's `disable_adapter`), so the
    frozen base serves as DPO's reference with no second copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.buffers()), next(iter(module.parameters()), torch.empty(0))).device


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (the base must be full precision): a plain model again."""

    def merged(name: str, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, LoRALinear):
            return None
        if not isinstance(child.base, nn.Linear):
            raise ConfigError(f"{name}: merge needs a full-precision base, not {type(child.base).__name__}")
        with torch.no_grad():
            child.base.weight.copy_(child.merged_weight())
        return child.base

    return swap_modules(model, merged)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under our module names (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def peft_name(name: str) -> str:
    """Our adapter key as PEFT saves it for a transformers `LlamaForCausalLM`."""
    return "base_model.model." + name


def save_adapter(config: LoRAConfig, state: dict[str, Tensor], out_dir: Path, base_model: str) -> Path:
    """Write adapter weights (`state`, our names) and their config in PEFT's format."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({peft_name(k): v.detach().float().contiguous() for k, v in state.items()}, out_dir / ADAPTER_WEIGHTS)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out_dir


def read_adapter(adapter_dir: Path) -> tuple[dict, LoRAConfig, dict[str, Tensor]]:
    """(PEFT config, our LoRAConfig, weights under our names) of a PEFT LoRA adapter dir."""
    from safetensors.torch import load_file

    try:
        raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: unreadable ({e})") from None
    if raw.get("peft_type") != "LORA" or raw.get("use_rslora") or raw.get("use_dora"):
        raise CheckpointError(f"{adapter_dir}: only plain LoRA adapters are supported (peft_type LORA, no rsLoRA/DoRA)")
    targets = raw["target_modules"]
    config = LoRAConfig(
        rank=raw["r"], alpha=raw["lora_alpha"], dropout=0.0, targets=[targets] if isinstance(targets, str) else list(targets)
    )
    prefix = "base_model.model."
    weights = {
        k.removeprefix(prefix).replace(".default.", "."): v for k, v in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items()
    }
    return raw, config, weights


def load_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Apply a PEFT LoRA adapter to `model` (in place) and load its weights."""
    _, config, weights = read_adapter(adapter_dir)
    apply_lora(model, config)
    expected = set(adapter_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(f"{adapter_dir}: adapter does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(weights, strict=False)
    return model
