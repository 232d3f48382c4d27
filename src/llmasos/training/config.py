"""Training configs: `TrainConfig` for pretraining, and `FinetuneConfig`, the same keys with fine-tuning's
defaults plus keys of its own (method, LoRA, epochs, ...).

Every field is a YAML key and a command-line flag (`max_steps: 100` is `--max-steps 100`); its one-line
description (the field's `help` metadata) and its default are the flag's help. Unknown keys and values
of the wrong type are refused with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from llmasos.errors import ConfigError


def key(default: Any, help: str) -> Any:
    """A config field: its default and its one-line description."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Pretraining: a new model on data prepared by `llmasos prepare`."""

    model: Any = key("tiny-gqa", "a zoo shape (`llmasos models`), or a mapping of ModelConfig fields (config.json names)")
    data: str = key("", "the prepared data dir (`llmasos prepare ... --out DIR`)")
    out: str = key("runs/pretrain", "the run dir: config.yaml, metrics.csv, loss.png, checkpoints/, final/")
    seq_len: int = key(256, "tokens per training sequence")
    micro_batch_size: int = key(8, "sequences per forward and backward pass")
    global_batch_size: int = key(8, "sequences per optimizer step; gradient accumulation makes up the rest")
    lr: float = key(3e-4, "the peak learning rate, reached at the end of the warmup")
    warmup_steps: int = key(100, "steps of linear warmup to lr")
    min_lr: float = key(3e-5, "the learning rate at the end of the cosine decay")
    weight_decay: float = key(0.1, "AdamW's weight decay of the weight matrices; norms and biases get none")
    grad_clip: float = key(1.0, "the largest gradient norm; 0 disables clipping")
    max_steps: int | None = key(None, "optimizer steps to train (this or max_tokens is required)")
    max_tokens: int | None = key(None, "tokens to train on, instead of max_steps")
    eval_every: int = key(100, "steps between validation losses")
    eval_batches: int = key(8, "validation batches per validation loss")
    checkpoint_every: int = key(100, "steps between checkpoints")
    keep_checkpoints: int = key(2, "checkpoints kept, the newest")
    log_every: int = key(10, "steps between rows of metrics.csv")
    precision: str = key("bf16-mixed", "bf16-mixed (fp32 weights, bf16 autocast) or fp32")
    activation_checkpointing: bool = key(False, "recompute activations in the backward pass: less memory, more time")
    seed: int = key(0, "the seed of the initial weights and of the batches drawn")
    strategy: str = key("ddp", "under torchrun: ddp (a replica per process) or fsdp (FSDP2: weights sharded)")

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"precision": ("fp32", "bf16-mixed"), "strategy": ("ddp", "fsdp")}
    LENGTHS: ClassVar[tuple[str, ...]] = ("max_steps", "max_tokens")  # what sets the length of a run (one at least)

    def __post_init__(self) -> None:
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in (
            "seq_len",
            "micro_batch_size",
            "global_batch_size",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        if all(getattr(self, name) is None for name in self.LENGTHS):
            raise ConfigError(f"set {', '.join(self.LENGTHS[:-1])} or {self.LENGTHS[-1]}")

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.max_tokens is None:
            raise ConfigError("epochs needs a data set of examples; set max_steps or max_tokens")
        return max(1, self.max_tokens // (self.global_batch_size * self.seq_len))

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """Each key and its type."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        """Each key's one-line description, ending with its default where the description does not give it."""
        out = {}
        for f in dataclasses.fields(cls):
            text = f.metadata["help"]
            if "default" not in text and f.default not in (None, ""):
                text += f" (default: {_show(f.default)})"
            out[f.name] = text
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> Self:
        keys = cls.keys()
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
        return cls(**{k: _coerce(k, v, keys[k], where) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: Path | str, overrides: dict[str, Any] | None = None) -> Self:
        """The keys of a YAML file, with `overrides` (the flags) over them."""
        path = Path(path)
        return cls.from_dict({**_read_yaml(path), **(overrides or {})}, where=str(path))

    @classmethod
    def from_run(cls, run: Path | str, overrides: dict[str, Any] | None = None) -> Self:
        """The config a run dir saved (its `config.yaml`), with `overrides`; `out` is the run dir. Keys only the
        other verb's config has are dropped: runs written before pretrain and finetune had configs of their
        own saved the keys of both."""
        path = Path(run) / "config.yaml"
        keys, others = cls.keys(), set(TrainConfig.keys()) ^ set(FinetuneConfig.keys())
        values = {k: v for k, v in _read_yaml(path).items() if k in keys or k not in others}
        return cls.from_dict({**values, **(overrides or {}), "out": str(run)}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning a model (full, LoRA or QLoRA) on instruction data, a task's examples or a prepared dir, or
    by DPO on preference pairs (`dpo`, with any of the three methods; `method: dpo` is full DPO)."""

    model: str = key("", "the model to start from: a store name or a model dir")
    data: str = key(
        "",
        "instruction records (Alpaca, chat or prompt/completion; JSON or JSONL), preference pairs with dpo "
        "(prompt/chosen/rejected), or a prepared dir",
    )
    out: str = key("runs/finetune", "the run dir: config.yaml, metrics.csv, loss.png, checkpoints/, adapter/, final/")
    seq_len: int = key(512, "tokens per training sequence; longer examples are cut")
    micro_batch_size: int = key(4, "sequences per forward and backward pass")
    # None, which TrainConfig's lr does not allow, means "by method"
    lr: float | None = key(  # type: ignore[assignment]
        None,
        "the peak learning rate, reached at the end of the warmup (default: 2e-5 for full, 2e-4 for lora and qlora); "
        "with dpo 1e-6 for full, 1e-5 for lora and qlora",
    )
    warmup_steps: int = key(10, "steps of linear warmup to lr")
    min_lr: float = key(0.0, "the learning rate at the end of the cosine decay")
    weight_decay: float = key(0.0, "AdamW's weight decay of the weight matrices; norms and biases get none")
    max_steps: int | None = key(None, "optimizer steps to train, instead of epochs")
    max_tokens: int | None = key(None, "tokens to train on, instead of epochs (a prepared dir needs this or max_steps)")
    eval_every: int = key(50, "steps between validation losses")
    seed: int = key(0, "the seed of the adapters' initial weights, the validation split and the batch order")
    method: str = key(
        "full",
        "full (every weight trained), lora (adapters on the frozen model) or qlora (adapters on the frozen model "
        "quantized); dpo is full with dpo",
    )
    lora_rank: int = key(8, "lora/qlora: the rank of the adapters")
    lora_alpha: float = key(16.0, "lora/qlora: the adapters' scale is lora_alpha / lora_rank")
    lora_dropout: float = key(0.0, "lora/qlora: dropout on the adapters' input")
    lora_targets: str = key("q_proj,v_proj", "lora/qlora: comma-separated projection names to adapt, or all-linear")
    quantize: str = key("int4", "qlora: the frozen model's weights, int8 or int4")
    epochs: float | None = key(1.0, "passes over the examples, when neither max_steps nor max_tokens is set")
    val_fraction: float = key(0.05, "the share of the examples held out for validation")
    merge: bool = key(False, "lora/qlora: also write the model with the adapters folded in (final/)")
    task: str | None = key(
        None, "an evaluation task (built-in name or YAML) whose examples are the training data, instead of data"
    )
    dpo: bool = key(
        False,
        "train on preference pairs by DPO against a reference: the starting model (full), or the base with the "
        "adapters disabled (lora, qlora)",
    )
    beta: float = key(0.1, "dpo: the rewards' scale; higher keeps the model nearer the reference (ipo: its tau)")
    loss_type: str = key("sigmoid", "dpo: sigmoid (DPO), ipo, hinge or robust, as TRL names them")
    label_smoothing: float = key(
        0.0, "dpo: the chance a preference is flipped, in [0, 0.5): conservative DPO for sigmoid, robust DPO for robust"
    )
    precompute_ref_log_probs: bool = key(
        False, "dpo: the reference's log-probabilities computed once per pair before training, not at every step"
    )

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **TrainConfig.CHOICES,
        "method": ("full", "lora", "qlora", "dpo"),
        "quantize": ("int8", "int4"),
        "loss_type": ("sigmoid", "ipo", "hinge", "robust"),
    }
    LENGTHS: ClassVar[tuple[str, ...]] = ("max_steps", "max_tokens", "epochs")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.method == "dpo":  # the shorthand, saved as what it means
            self.method, self.dpo = "full", True
        if self.beta <= 0:
            raise ConfigError(f"beta: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.dpo and self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ConfigError(f"label_smoothing applies to the sigmoid and robust losses, not {self.loss_type}")
        if self.lr is None:
            if self.dpo:
                self.lr = 1e-6 if self.method == "full" else 1e-5
            else:
                self.lr = 2e-5 if self.method == "full" else 2e-4

    @classmethod
    def from_run(cls, run: Path | str, overrides: dict[str, Any] | None = None) -> Self:
        overrides = dict(overrides or {})
        if "epochs" in overrides and "max_steps" not in overrides:  # the saved steps came from the old epochs
            overrides["max_steps"] = None
        return super().from_run(run, overrides)

    def epoch_steps(self, examples: int) -> int:
        """Optimizer steps of `epochs` passes over `examples` examples (at least one)."""
        return max(1, math.ceil((self.epochs or 1.0) * examples / self.global_batch_size))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return values


def _coerce(name: str, value: Any, hint: Any, where: str) -> Any:
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
    raise ConfigError(f"{where}: {name} must be {names}, got {value!r}")
