"""GGUF, the file format of llama.cpp and Ollama: read one as a checkpoint, and write one.

Writing puts the metadata llama.cpp reads and each tensor under llama.cpp's name. llama.cpp's `llama`
architecture rotates interleaved pairs, so Q and K rows are reordered into that layout (as llama.cpp's
own converter does); its `qwen2` architecture rotates the half-split pairs our model uses, so nothing
moves there. Reading undoes all of it: tensors are dequantised by `gguf.quants` one at a time while
the model is filled. Files are read through `gguf.GGUFReader`'s memory map; nothing in a file is ever
executed. The vocabulary is converted to and from tokenizer files in `gguf_vocab`; `export` puts a
whole model into a GGUF.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llmasos.checkpoints.meta import interleave_rotary, permute_rotary
from llmasos.checkpoints.weights import TensorEntry, load_tensor
from llmasos.errors import CheckpointError, LLMasOSError
from llmasos.models.config import ModelConfig
from llmasos.models.llama import rope_inv_freq
from llmasos.progress import progress_bar

GGUF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # Mistral's GGUFs say "llama"
Q = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
AUTO_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# What `gguf.quants` dequantises: the float types, the legacy block types and the K-quants.
READABLE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}

# Our name inside `model.layers.N.` -> llama.cpp's inside `blk.N.`
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling: one divisor per rotary frequency


def tensor_names(config: ModelConfig) -> dict[str, str]:
    """Our tensor names -> llama.cpp's, for every tensor a model of this shape may have."""
    names = dict(TOP_NAMES)
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in LAYER_NAMES.items()})
    return names


def _rotary_heads(config: ModelConfig, name: str) -> int | None:
    """Heads whose rows change layout between us and llama.cpp's `llama` (None: the tensor is stored as is)."""
    if GGUF_ARCHS[config.architecture] != "llama":
        return None
    if ".self_attn.q_proj." in name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in name:
        return config.num_key_value_heads
    return None


# ---- write -------------------------------------------------------------------------------------------


def _tensor_type(name: str, shape: tuple[int, ...], dtype: str, tied: bool) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter's rules: 1-D tensors stay F32; rows that do not fill whole blocks fall back to
    F16; with q4_0 the output projection (the embedding when tied) keeps Q8_0, as llama-quantize keeps
    it at a higher precision than the rest."""
    if len(shape) == 1:
        return Q.F32
    output = name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")
    qtype = EXPORT_TYPES["q8_0" if dtype == "q4_0" and output else dtype]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def _write_hparams(writer: gguf.GGUFWriter, config: ModelConfig, name: str, file_type: int) -> int:
    """The `{arch}.*` keys; returns the context length written."""
    writer.add_name(name)
    context = config.max_position_embeddings
    if config.sliding_window is not None and config.sliding_window < context:
        warnings.warn(
            f"llama.cpp has no sliding window for this architecture: the GGUF's context length is "
            f"clipped to the window, {config.sliding_window} tokens (the model says {context})",
            stacklevel=2,
        )
        context = config.sliding_window
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return context


def _rope_factors(config: ModelConfig) -> torch.Tensor:
    """Llama 3.1 scaling as llama.cpp takes it: each frequency's divisor (unscaled / scaled)."""
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    return plain / rope_inv_freq(config)


def write_gguf(
    out: Path,
    config: ModelConfig,
    entries: dict[str, TensorEntry],
    dtype: str,
    name: str,
    write_vocab: Callable[[gguf.GGUFWriter], None],
    progress: bool = True,
    pooling: str | None = None,
) -> int:
    """Write the model `entries` hold as the GGUF file `out`, its matrices in `dtype` (f32, f16, bf16, q8_0 or
    q4_0), under a temporary name renamed when complete; `write_vocab` adds the `tokenizer.*` keys. Returns
    the context length written. pooling: the embeddings' pooling the model names (`{arch}.pooling_type`)."""
    writer = gguf.GGUFWriter(None, GGUF_ARCHS[config.architecture])
    context = _write_hparams(writer, config, name, FILE_TYPES[dtype])
    if pooling is not None:
        if pooling.upper() in gguf.PoolingType.__members__:
            writer.add_pooling_type(gguf.PoolingType[pooling.upper()])
        else:
            warnings.warn(f"GGUF has no pooling type for {pooling!r} pooling; the file names none", stacklevel=2)
    write_vocab(writer)

    plan = []  # (our name, GGUF name, type), in the order the data follows
    for ours, theirs in tensor_names(config).items():
        if ours not in entries:
            continue
        qtype = _tensor_type(ours, entries[ours].shape, dtype, config.tie_word_embeddings)
        plan.append((ours, theirs, qtype))
    if config.rope_type == "llama3":
        plan.append((None, ROPE_FREQS, Q.F32))
    for ours, theirs, qtype in plan:
        shape = entries[ours].shape if ours else (config.head_dim // 2,)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(theirs, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        items = plan
        if progress:
            items = progress_bar(plan, desc=f"writing {out.name}", unit="tensor", leave=False)
        for ours, _, qtype in items:
            if ours is None:
                w = _rope_factors(config)
            else:
                w = load_tensor(entries[ours], torch.float32, ours)
                heads = _rotary_heads(config, ours)
                if heads is not None:
                    w = interleave_rotary(w, heads)
            writer.write_tensor_data(gguf.quants.quantize(w.contiguous().numpy(), qtype))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return context


# ---- read --------------------------------------------------------------------------------------------


def open_reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # the reader raises ValueError/IndexError for a bad magic or a truncated file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def read_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _dequantize(tensor: gguf.ReaderTensor, shape: tuple[int, ...], heads: int | None) -> torch.Tensor:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    w = torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(shape)
    return permute_rotary(w, heads) if heads is not None else w


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, TensorEntry]]:
    """The config and our-named tensors of a GGUF file. Plain F32/F16/BF16 tensors are memory-mapped;
    quantized ones (and Q/K, which change layout) are dequantised to float32 when read."""
    reader = open_reader(path)
    _check_tensor_data(reader, path)
    arch = read_field(reader, "general.architecture")
    if arch not in HF_ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(HF_ARCHS)}")
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type not in READABLE_TYPES:
            raise CheckpointError(
                f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which cannot be read here; "
                f"readable types: {', '.join(q.name for q in READABLE_TYPES)}"
            )
    config = _config(reader, arch, tensors, path)
    ours = {theirs: name for name, theirs in tensor_names(config).items()}
    entries = {}
    for name, t in tensors.items():
        if name == ROPE_FREQS:
            continue
        if name not in ours:
            raise CheckpointError(f"{path}: unexpected tensor {name} (not part of a GGUF {arch} model we can read)")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        heads = _rotary_heads(config, ours[name])
        dtype = FLOAT_TYPES.get(t.tensor_type)
        if dtype is not None and heads is None:
            entries[ours[name]] = TensorEntry(path, dtype, shape, t.data_offset, t.data_offset + t.n_bytes)
        else:
            entries[ours[name]] = TensorEntry(path, torch.float32, shape, decode=partial(_dequantize, t, shape, heads))
    return config, entries


def _check_tensor_data(reader: gguf.GGUFReader, path: Path) -> None:
    """Every tensor's dimensions are from 1 to the file's size and its data lies inside the file. The reader
    adds offsets as uint64, so an offset near 2**64 wraps around onto the metadata; here sums are Python ints."""
    size = len(reader.data)
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        if not all(1 <= d <= size for d in dims):
            raise CheckpointError(
                f"{path}: tensor {t.name} has dimensions {dims}; each must be from 1 to the file's size ({size} bytes)"
            )
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        start = reader.data_offset + int(t.field.parts[-1][0])  # the offset as stored, from the data section
        end = start + math.prod(dims) // block * type_size
        if end > size:
            raise CheckpointError(f"{path}: tensor {t.name}'s data (bytes {start} to {end}) lies outside the file ({size} bytes)")


def _config(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor], path: Path) -> ModelConfig:
    """A `ModelConfig` from the `{arch}.*` keys (and the shapes where a key may be absent)."""

    def key(name: str, default: Any = None) -> Any:
        return read_field(reader, f"{arch}.{name}", default)

    def count(name: str, high: int, bound: str, default: int | None = None) -> int:
        """A count or size key: an integer from 1 to `high`; beyond it the file cannot hold such a model."""
        value = key(name, default)
        if value is None:
            raise CheckpointError(f"{path}: the key {arch}.{name} is missing")
        if type(value) is not int or not 1 <= value <= high:
            raise CheckpointError(f"{path}: {arch}.{name} is {value!r}; expected an integer from 1 to {high} ({bound})")
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")
    embedding = [int(d) for d in tensors["token_embd.weight"].shape]
    if len(embedding) != 2:
        raise CheckpointError(f"{path}: tensor token_embd.weight has dimensions {embedding}, expected 2")
    hidden, vocab = embedding
    nbytes, in_file = len(reader.data), f"the file has {len(reader.data)} bytes"
    heads = count("attention.head_count", hidden, "the embedding width")
    head_dim = count("attention.key_length", nbytes, in_file, hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(
            f"{path}: rotary embedding on part of each head ({key('rope.dimension_count')} of {head_dim} dims) is not supported"
        )
    rope_scaling = None
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported (none, linear, Llama 3's)")
    types = {t.tensor_type for n, t in tensors.items() if len(t.shape) > 1}
    dtype = {Q.F16: "float16", Q.BF16: "bfloat16"}
    eos = read_field(reader, "tokenizer.ggml.eos_token_id")
    eot = read_field(reader, "tokenizer.ggml.eot_token_id")
    intermediate = count("feed_forward_length", nbytes, in_file)
    layers = count("block_count", len(tensors), f"the file holds {len(tensors)} tensors")
    kv_heads = count("attention.head_count_kv", heads, "the head count", heads)
    context = count("context_length", 2**32 - 1, "llama.cpp's limit", 4096)
    try:
        config = ModelConfig(
            architecture=HF_ARCHS[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=context,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=arch == "llama" and "blk.0.attn_output.bias" in tensors,
            qkv_bias=arch == "qwen2",
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=[eos, eot] if eot is not None and eos is not None and eot != eos else eos,
            pad_token_id=read_field(reader, "tokenizer.ggml.padding_token_id"),
            dtype=dtype.get(next(iter(types)), "float32") if len(types) == 1 else "float32",
        )
    except (LLMasOSError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if ROPE_FREQS in tensors:
        config = _llama3_rope(config, tensors[ROPE_FREQS], path)
    return config


def _llama3_rope(config: ModelConfig, tensor: gguf.ReaderTensor, path: Path) -> ModelConfig:
    """llama.cpp keeps only the per-frequency divisors of Llama 3.1 scaling; recover the scaling they come
    from (Llama 3.1/3.2's band: low 1, high 4, 8192 original positions) and check it gives the same divisors."""
    factors = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))).reshape(-1)
    if torch.allclose(factors, torch.ones_like(factors)):
        return config
    scaling = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = dataclasses.replace(config, rope_scaling=scaling)
    if factors.shape != (config.head_dim // 2,) or not torch.allclose(_rope_factors(config), factors, rtol=1e-4):
        raise CheckpointError(
            f"{path}: tensor {ROPE_FREQS} holds rope frequency factors that are not Llama 3.1's "
            f"scaling; they cannot be represented here"
        )
    return config
