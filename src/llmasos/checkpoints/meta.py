"""Meta's original checkpoints: `params.json` + `consolidated.NN.pth` (one per model-parallel rank).

Shards are merged along the dimension each layer was split on, and Q/K are permuted from Meta's
interleaved rotary pairs to the Hugging Face half-split layout our model uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmasos.checkpoints.weights import TensorEntry, read_pickled
from llmasos.errors import CheckpointError
from llmasos.models.config import ModelConfig
from llmasos.outputs import read_json

# Meta name -> (HF name, dim the model-parallel shards split it on; None: replicated).
_LAYER_MAP = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_MAP = {"norm.weight": ("model.norm.weight", None), "output.weight": ("lm_head.weight", 0)}


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").exists() and any(path.glob("consolidated.*.pth"))


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (and GGUF) interleave each head's rotary pairs (x0, x1), (x2, x3)...; HF pairs i with i + d/2.

    w: a Q or K weight [out, in] or bias [out] in the interleaved layout; returns the HF layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary`: HF half-split rotary pairs back to the interleaved layout."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _merge(parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    if len(parts) == 1 or dim is None:
        return parts[0]
    return torch.cat(parts, dim=dim)


def read_meta_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, TensorEntry]]:
    """The config and HF-named tensors of a Meta checkpoint dir."""
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    shards = [read_pickled(f) for f in files]
    names = set(shards[0])
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != names:
            raise CheckpointError(f"{f}: holds different tensors than {files[0].name}")
    try:
        dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    except KeyError as e:
        raise CheckpointError(f"{path / 'params.json'}: missing key {e.args[0]!r}") from None
    n_kv = params.get("n_kv_heads") or n_heads

    def parts(meta_name: str) -> list[torch.Tensor]:
        if meta_name not in names:
            raise CheckpointError(f"{files[0]}: tensor {meta_name} is missing from the checkpoint")
        return [s[meta_name].tensor for s in shards]

    emb_parts = parts("tok_embeddings.weight")
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab < 0:
        vocab = emb_parts[0].shape[0] if len(emb_parts) == 1 else None
    # Llama 1/2 split the embedding along its width, Llama 3 along the vocabulary.
    split_width = len(emb_parts) > 1 and (vocab is None or emb_parts[0].shape[0] == vocab)
    state = {"model.embed_tokens.weight": _merge(emb_parts, 1 if split_width else 0)}
    vocab = state["model.embed_tokens.weight"].shape[0]
    for i in range(n_layers):
        for meta_name, (hf_name, split) in _LAYER_MAP.items():
            w = _merge(parts(f"layers.{i}.{meta_name}"), split)
            if meta_name == "attention.wq.weight":
                w = permute_rotary(w, n_heads)
            elif meta_name == "attention.wk.weight":
                w = permute_rotary(w, n_kv)
            state[f"model.layers.{i}.{hf_name}"] = w
    state["model.norm.weight"] = parts("norm.weight")[0]
    tied = "output.weight" not in names
    if not tied:
        state["lm_head.weight"] = _merge(parts("output.weight"), 0)
    known = {"tok_embeddings.weight", "norm.weight", "output.weight", "rope.freqs"}
    known |= {f"layers.{i}.{n}" for i in range(n_layers) for n in _LAYER_MAP}
    extra = sorted(names - known)
    if extra:
        raise CheckpointError(f"{files[0]}: unexpected tensor {extra[0]}")

    rope_scaling = None
    if params.get("use_scaled_rope"):
        rope_scaling = {
            "rope_type": "llama3",
            "factor": float(params.get("rope_scaling_factor", 8.0)),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    llama3 = vocab >= 128000
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        intermediate_size=state["model.layers.0.mlp.gate_proj.weight"].shape[0],
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
        max_position_embeddings=131072 if rope_scaling else (8192 if llama3 else 4096),
        bos_token_id=128000 if llama3 else 1,
        eos_token_id=128001 if llama3 else 2,
        dtype=str(state["model.embed_tokens.weight"].dtype).removeprefix("torch."),
    )
    entries = {k: TensorEntry(files[0], v.dtype, tuple(v.shape), tensor=v) for k, v in state.items()}
    return config, entries
