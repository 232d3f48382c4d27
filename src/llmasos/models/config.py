"""`ModelConfig`: the shape of a LLaMA-family model, with transformers' `config.json` names.

One dataclass covers Llama 1/2/3/3.1/3.2, TinyLlama, SmolLM, Mistral and Qwen2: the
variants differ only in flags (GQA, rope scaling, tied embeddings, QKV bias, sliding window).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from llmasos.errors import ConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o (Llama's flag)
    qkv_bias: bool = False  # bias on q, k and v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1: attend to the last N positions only
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"
    dtype: str = "float32"  # dtype of the stored weights
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other config.json keys, kept on write

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu', SwiGLU)")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.setdefault("rope_type", self.rope_scaling.pop("type", "default"))
            if kind not in ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
            if kind == "default":
                self.rope_scaling = None
            elif "factor" not in self.rope_scaling:
                raise ConfigError(f"rope_scaling of type {kind!r} needs a 'factor'")

    # ---- derived figures -------------------------------------------------

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameter count computed from the shape (what `llmasos models` prints)."""
        assert self.head_dim is not None and self.num_key_value_heads is not None  # set by __post_init__
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv + h
        elif self.qkv_bias:
            attn += q + 2 * kv
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_hidden_layers * per_layer + h + head

    # ---- construction from user input ------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "model") -> ModelConfig:
        """Build from a user mapping (a YAML `model:` block); unknown keys are refused by name."""
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**values)

    # ---- transformers' config.json ---------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a transformers `config.json` (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {v: k for k, v in MODEL_TYPES.items()}.get(cfg.get("model_type", ""), "")
        if arch not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: architecture {arch or cfg.get('model_type')!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        values: dict[str, Any] = {"architecture": arch}
        names = set(cls.field_names()) - {"architecture", "extra", "qkv_bias", "rope_scaling", "rope_theta", "dtype"}
        for name in names:
            if cfg.get(name) is not None:
                values[name] = cfg[name]
        rope = cfg.get("rope_parameters")
        if rope:  # transformers 5
            rope = dict(rope)
            values["rope_theta"] = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
            values["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        else:
            values["rope_theta"] = cfg.get("rope_theta", 10000.0)
            values["rope_scaling"] = cfg.get("rope_scaling")
        dtype = cfg.get("dtype") or cfg.get("torch_dtype")
        if dtype:
            values["dtype"] = str(dtype).removeprefix("torch.")
        if arch == "Qwen2ForCausalLM":
            values["qkv_bias"] = True
            if not cfg.get("use_sliding_window", False):
                values.pop("sliding_window", None)
            elif cfg.get("max_window_layers", 0) < cfg.get("num_hidden_layers", 0):
                raise ConfigError(f"{source}: Qwen2 sliding window on only some layers is not supported")
        if arch == "LlamaForCausalLM":
            values.pop("sliding_window", None)
        if cfg.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported")
        kept = {
            "model_type",
            "architectures",
            "rope_parameters",
            "transformers_version",
            "torch_dtype",
            "use_sliding_window",
            "max_window_layers",
            "pretraining_tp",
            "use_cache",
        }
        values["extra"] = {k: v for k, v in cfg.items() if k not in names and k not in kept and k not in values}
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` transformers reads (v4 style, which transformers 5 also reads)."""
        cfg: dict[str, Any] = dict(self.extra)
        cfg.update(
            architectures=[self.architecture],
            model_type=MODEL_TYPES[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            torch_dtype=self.dtype,
            use_cache=True,
        )
        if self.architecture == "Qwen2ForCausalLM":
            if not self.qkv_bias or self.attention_bias or self.mlp_bias:
                raise ConfigError("Qwen2ForCausalLM has bias on q, k, v only (qkv_bias=True, no other bias)")
            cfg.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                max_window_layers=self.num_hidden_layers,
            )
        else:
            if self.qkv_bias:
                raise ConfigError(f"qkv_bias without o_proj bias is a Qwen2 layout; {self.architecture} cannot hold it")
            cfg.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
            if self.architecture == "MistralForCausalLM":
                cfg["sliding_window"] = self.sliding_window
            elif self.sliding_window is not None:
                raise ConfigError("sliding_window needs architecture MistralForCausalLM or Qwen2ForCausalLM")
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_hf_config(), indent=2, sort_keys=True)
