"""`TrainConfig`: every key of a training YAML, each also a command-line flag.

Unknown keys and values of the wrong type are refused with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos.errors import ConfigError


@dataclass
class TrainConfig:
    model: Any = "tiny-gqa"  # a zoo name, or a mapping of ModelConfig fields (config.json names)
    data: str = ""  # a dir written by `llmasos prepare`
    out: str = "runs/pretrain"
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8  # sequences per optimizer step; gradient accumulation makes up the rest
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr: float = 3e-5  # the cosine decay ends here
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    max_steps: int | None = None
    max_tokens: int | None = None  # alternative to max_steps: tokens seen in training
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    precision: str = "bf16-mixed"  # or "fp32"
    activation_checkpointing: bool = False
    seed: int = 0
    strategy: str = "ddp"  # under torchrun: ddp (a replica per process) or fsdp (FSDP2: weights sharded)
    # Fine-tuning (`llmasos finetune`): `model` is then the model to start from, `data` an instruction
    # file (Alpaca, chat or prompt/completion JSON/JSONL) or a prepared dir.
    method: str = "full"  # full | lora | qlora
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"  # comma-separated projection names, or all-linear
    quantize: str = "int4"  # qlora's frozen base: int8 or int4
    epochs: float | None = None  # alternative to max_steps for instruction data
    val_fraction: float = 0.05  # of the instruction examples, held out for validation
    merge: bool = False  # lora/qlora: also write the base with the adapter folded in
    task: str | None = None  # a task (name or YAML) whose examples are the training data

    def __post_init__(self) -> None:
        for key, allowed in (("precision", ("fp32", "bf16-mixed")), ("strategy", ("ddp", "fsdp")),
                             ("method", ("full", "lora", "qlora")), ("quantize", ("int8", "int4"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                              f"{self.micro_batch_size}")
        if self.max_steps is None and self.max_tokens is None and self.epochs is None:
            raise ConfigError("set max_steps, max_tokens or epochs")

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.max_tokens is None:
            raise ConfigError("epochs needs a data set of examples; set max_steps or max_tokens")
        return max(1, self.max_tokens // (self.global_batch_size * self.seq_len))

    @classmethod
    def keys(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        keys = cls.keys()
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
        return cls(**{k: _coerce(k, v, keys[k], where) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: Path | str, overrides: dict[str, Any] | None = None,
                  defaults: dict[str, Any] | None = None) -> "TrainConfig":
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        return cls.from_dict({**(defaults or {}), **values, **(overrides or {})}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check (and for flags given as strings, convert) a value against its field's type."""
    if hint is Any:
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is bool and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if isinstance(value, str) and t in (int, float):
            try:
                return t(value)
            except ValueError:
                continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"{where}: {key} must be {names}, got {value!r}")
