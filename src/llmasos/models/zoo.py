"""The zoo: named shapes of real models, as data.

Each entry is the `config.json` shape of the published checkpoint (the Hugging Face id is kept
for `llmasos pull`); parameter counts are computed from the shape, never written down.
"""

from __future__ import annotations

from typing import Any

from llmasos.errors import ConfigError
from llmasos.models.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
_SMOLLM2 = dict(
    vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0
)

ZOO: dict[str, dict[str, Any]] = {
    # Llama 1
    "llama-7b": dict(
        hf_id="huggyllama/llama-7b",
        **{**_LLAMA2, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    # Llama 2
    "llama-2-7b": dict(
        hf_id="meta-llama/Llama-2-7b-hf",
        **_LLAMA2,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    "llama-2-13b": dict(
        hf_id="meta-llama/Llama-2-13b-hf",
        **_LLAMA2,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
    ),
    "llama-2-70b": dict(
        hf_id="meta-llama/Llama-2-70b-hf",
        **_LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    # Llama 3, 3.1, 3.2
    "llama-3-8b": dict(
        hf_id="meta-llama/Meta-Llama-3-8B",
        **_LLAMA3,
        max_position_embeddings=8192,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-3.1-8b": dict(
        hf_id="meta-llama/Llama-3.1-8B",
        **_LLAMA3,
        max_position_embeddings=131072,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama-3.1-70b": dict(
        hf_id="meta-llama/Llama-3.1-70B",
        **_LLAMA3,
        max_position_embeddings=131072,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3.2-1b": dict(
        hf_id="meta-llama/Llama-3.2-1B",
        **_LLAMA3,
        max_position_embeddings=131072,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    "llama-3.2-3b": dict(
        hf_id="meta-llama/Llama-3.2-3B",
        **_LLAMA3,
        max_position_embeddings=131072,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        tie_word_embeddings=True,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
    ),
    # TinyLlama, SmolLM2
    "tinyllama-1.1b": dict(
        hf_id="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        **{**_LLAMA2, "max_position_embeddings": 2048},
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "smollm2-135m": dict(
        hf_id="HuggingFaceTB/SmolLM2-135M",
        **_SMOLLM2,
        rope_theta=100000.0,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "smollm2-360m": dict(
        hf_id="HuggingFaceTB/SmolLM2-360M",
        **_SMOLLM2,
        rope_theta=100000.0,
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
    ),
    "smollm2-1.7b": dict(
        hf_id="HuggingFaceTB/SmolLM2-1.7B",
        **_SMOLLM2,
        rope_theta=130000.0,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    # Mistral, Qwen2
    "mistral-7b-v0.1": dict(
        hf_id="mistralai/Mistral-7B-v0.1",
        architecture="MistralForCausalLM",
        vocab_size=32000,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        sliding_window=4096,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2.5-0.5b": dict(
        hf_id="Qwen/Qwen2.5-0.5B",
        architecture="Qwen2ForCausalLM",
        qkv_bias=True,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    "qwen2.5-1.5b": dict(
        hf_id="Qwen/Qwen2.5-1.5B",
        architecture="Qwen2ForCausalLM",
        qkv_bias=True,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    # Tiny shapes for tests and the quickstart (random weights; no published checkpoint).
    "tiny-mha": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "tiny-gqa": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "tiny-mqa": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
    ),
}


def zoo_names() -> list[str]:
    return list(ZOO)


def hf_id(name: str) -> str | None:
    return ZOO[name].get("hf_id") if name in ZOO else None


def zoo_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a named shape; an unknown name lists the known ones."""
    if name not in ZOO:
        raise ConfigError(f"unknown model shape {name!r}; known shapes: {', '.join(ZOO)}")
    values = {k: v for k, v in ZOO[name].items() if k != "hf_id"}
    return ModelConfig(**values)
