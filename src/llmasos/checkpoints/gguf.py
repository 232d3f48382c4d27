"""GGUF, the file format of llama.cpp and Ollama: export a model to it, and read one as a checkpoint.

Export writes the metadata llama.cpp reads, the tokenizer's vocabulary, and each tensor under
llama.cpp's name. llama.cpp's `llama` architecture rotates interleaved pairs, so Q and K rows are
reordered into that layout (as llama.cpp's own converter does); its `qwen2` architecture rotates the
half-split pairs our model uses, so nothing moves there. Import undoes all of it: tensors are
dequantised by `gguf.quants` one at a time while the model is filled, and the tokenizer is rebuilt
from the vocabulary as a `tokenizer.json`. Files are read through `gguf.GGUFReader`'s memory map;
nothing in a file is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from llmasos.checkpoints.meta import interleave_rotary, permute_rotary
from llmasos.checkpoints.ollama import modelfile_path, write_modelfile, written_by_export
from llmasos.checkpoints.weights import TensorEntry, load_tensor
from llmasos.errors import CheckpointError, LLMasOSError
from llmasos.models.config import ModelConfig

if TYPE_CHECKING:
    from llmasos.tokenization import Tokenizer

GGUF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # Mistral's GGUFs say "llama"
Q = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
AUTO_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# What `gguf.quants` dequantises: the float types, the legacy block types and the K-quants.
READABLE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
                  Q.Q6_K)
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}

# Our name inside `model.layers.N.` -> llama.cpp's inside `blk.N.`
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling: one divisor per rotary frequency

# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre`: the regexes llama.cpp splits with, in order, and
# whether a word found whole in the vocabulary skips the merges (llama.cpp's `ignore_merges`).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
BPE_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    "llama-bpe": ([LLAMA3_SPLIT], True), "llama3": ([LLAMA3_SPLIT], True), "llama-v3": ([LLAMA3_SPLIT], True),
    "qwen2": ([QWEN2_SPLIT], False),
    "gpt-2": ([GPT2_SPLIT], False),
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
}
EXPORT_PRE_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", GPT2_SPLIT: "gpt-2"}  # Split regex -> name


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


# ---- export ------------------------------------------------------------------------------------------


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
        warnings.warn(f"llama.cpp has no sliding window for this architecture: the GGUF's context length is "
                      f"clipped to the window, {config.sliding_window} tokens (the model says {context})")
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
    import dataclasses

    from llmasos.models.llama import rope_inv_freq

    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    return plain / rope_inv_freq(config)


def export_gguf(model_dir: Path | str, out: Path | str, dtype: str = "auto", force: bool = False,
                progress: bool = True) -> Path:
    """Write the model in `model_dir` as one GGUF file that llama.cpp and Ollama load; returns its path.

    out: a `.gguf` path, or a directory to write `<model>-<dtype>.gguf` into. dtype: auto (as stored),
    f32, f16, bf16, q8_0 or q4_0. The file is written under a temporary name and renamed when complete;
    an Ollama `Modelfile` is written beside it.
    """
    from llmasos.checkpoints.load import build_meta_model, check_entries, open_checkpoint
    from llmasos.outputs import check_output
    from llmasos.tokenization import Tokenizer

    model_dir, out = Path(model_dir), Path(out)
    config, entries = open_checkpoint(model_dir)
    if dtype == "auto":
        dtype = AUTO_DTYPES.get(config.dtype, "f32")
    if dtype not in EXPORT_TYPES:
        raise LLMasOSError(f"GGUF dtype {dtype!r} is not supported; use auto or one of {', '.join(EXPORT_TYPES)}")
    check_entries(build_meta_model(config), entries, model_dir)
    name = model_dir.stem if model_dir.is_file() else model_dir.name  # a .gguf re-exported, or a dir
    if out.suffix != ".gguf":
        out = out / f"{name}-{dtype}.gguf"
    # A GGUF carries no mark of ours: one already there is replaced only with force.
    check_output(out, [model_dir], force, "llmasos export", owned=lambda path: False)
    check_output(modelfile_path(out), [model_dir], force, "llmasos export", owned=written_by_export)
    tokenizer = Tokenizer(model_dir)

    writer = gguf.GGUFWriter(None, GGUF_ARCHS[config.architecture])
    context = _write_hparams(writer, config, name, FILE_TYPES[dtype])
    write_vocab(writer, tokenizer, config)

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
            from tqdm import tqdm

            items = tqdm(plan, desc=f"writing {out.name}", unit="tensor", leave=False)
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
    stops = [tokenizer.decode([i], skip_special_tokens=False) for i in sorted(tokenizer.stop_ids)]
    write_modelfile(out, tokenizer.chat_template, stops, context)
    return out


def write_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, config: ModelConfig) -> None:
    """The tokenizer as llama.cpp's `tokenizer.ggml.*` keys: SentencePiece (a `tokenizer.model`, or a
    `tokenizer.json` converted from one, with byte fallback) as `llama` with pieces and scores; a byte-level
    BPE as `gpt2` with tokens, merges and the name of its pre-tokenizer."""
    sp_file = tokenizer.dir / "tokenizer.model"
    if sp_file.exists():
        tokens, scores, types = _sentencepiece_vocab(sp_file, tokenizer.config)
    else:
        data, tokens, types = _json_vocab(tokenizer.dir / "tokenizer.json")
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
        if data["model"].get("byte_fallback"):
            scores = _scores_from_merges(tokens, types, merges, data["model"].get("unk_token"))
        else:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_pre_tokenizer_name(data.get("pre_tokenizer"), tokenizer.dir / "tokenizer.json"))
            writer.add_token_merges(merges)
            scores = None
    if scores is not None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_pad(scores, config.vocab_size, -1000.0))
    if len(tokens) > config.vocab_size:
        raise CheckpointError(f"{tokenizer.dir}: the tokenizer has {len(tokens)} tokens, more than the model's "
                              f"vocab_size {config.vocab_size}")
    writer.add_token_list(_pad(tokens, config.vocab_size, None))
    writer.add_token_types(_pad(types, config.vocab_size, gguf.TokenType.UNUSED))
    for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id),
                   ("unk", tokenizer.token_to_id(tokenizer.unk_token))):
        if i is not None:
            getattr(writer, f"add_{key}_token_id")(i)
    extra_stops = sorted(tokenizer.stop_ids - {tokenizer.eos_id})
    if extra_stops:  # Llama 3's <|eot_id|>, ChatML's <|im_end|>: llama.cpp stops at it too
        writer.add_eot_token_id(extra_stops[0])
    probe = tokenizer.encode("a")
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_id)
    writer.add_chat_template(tokenizer.chat_template)


def _pad(values: list, size: int, fill: Any) -> list:
    """Rows of the embedding no token uses get llama.cpp's `[PADn]` placeholders."""
    return values + [f"[PAD{i}]" if fill is None else fill for i in range(len(values), size)]


def _sentencepiece_vocab(file: Path, tokenizer_config: dict[str, Any]) -> tuple[list[str], list[float], list[int]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(file))
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                     else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                     else gguf.TokenType.NORMAL)
    for key, tok in sorted((tokenizer_config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        i = int(key)
        tokens, scores, types = _pad(tokens, i + 1, None), _pad(scores, i + 1, -1000.0), \
            _pad(types, i + 1, gguf.TokenType.UNUSED)
        tokens[i], scores[i] = tok["content"], -1000.0
        types[i] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def _json_vocab(file: Path) -> tuple[dict[str, Any], list[str], list[int]]:
    """A BPE `tokenizer.json`, its tokens by id and their GGUF types."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file.parent}: no tokenizer (tokenizer.json or tokenizer.model)") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{file}: a {model.get('type')} tokenizer cannot be written to GGUF (BPE or "
                              f"SentencePiece only)")
    added = data.get("added_tokens", [])
    size = max([*model["vocab"].values(), *(t["id"] for t in added)], default=-1) + 1
    tokens: list[str] = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in model["vocab"].items():
        tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for t in added:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    for i, tok in enumerate(tokens):
        if tok == f"[PAD{i}]":  # a placeholder (ours, or from an imported GGUF) stays unused
            types[i] = gguf.TokenType.UNUSED
    return data, tokens, types


def _scores_from_merges(tokens: list[str], types: list[int], merges: list[str], unk: str | None) -> list[float]:
    """SentencePiece scores for a BPE written as merges: llama.cpp joins the pair whose joined piece scores
    highest, so a piece scores minus the rank of the merge that makes it. Byte pieces and <unk> get their types."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    scores = []
    for i, tok in enumerate(tokens):
        if types[i] == gguf.TokenType.NORMAL and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types[i] = gguf.TokenType.BYTE
        elif tok == unk:
            types[i] = gguf.TokenType.UNKNOWN
        scores.append(-float(rank[tok]) if tok in rank else 0.0 if len(tok) == 1 else -1e9)
    return scores


def _pre_tokenizer_name(pre: dict[str, Any] | None, file: Path) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, read from its structure."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = EXPORT_PRE_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise CheckpointError(
        f"{file}: its pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp equivalent known here; "
        f"byte-level BPE tokenizers export with GPT-2's ByteLevel split, Llama 3's or Qwen2's regex"
    )


# ---- import ------------------------------------------------------------------------------------------


def open_reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # the reader raises ValueError/IndexError for a bad magic or a truncated file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
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
    arch = _field(reader, "general.architecture")
    if arch not in HF_ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(HF_ARCHS)}")
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
            raise CheckpointError(f"{path}: tensor {t.name} has dimensions {dims}; each must be from 1 to the "
                                  f"file's size ({size} bytes)")
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        start = reader.data_offset + int(t.field.parts[-1][0])  # the offset as stored, from the data section
        end = start + math.prod(dims) // block * type_size
        if end > size:
            raise CheckpointError(f"{path}: tensor {t.name}'s data (bytes {start} to {end}) lies outside the "
                                  f"file ({size} bytes)")


def _config(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor], path: Path) -> ModelConfig:
    """A `ModelConfig` from the `{arch}.*` keys (and the shapes where a key may be absent)."""

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    def count(name: str, high: int, bound: str, default: int | None = None) -> int:
        """A count or size key: an integer from 1 to `high`; beyond it the file cannot hold such a model."""
        value = key(name, default)
        if value is None:
            raise CheckpointError(f"{path}: the key {arch}.{name} is missing")
        if type(value) is not int or not 1 <= value <= high:
            raise CheckpointError(f"{path}: {arch}.{name} is {value!r}; expected an integer from 1 to {high} "
                                  f"({bound})")
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
        raise CheckpointError(f"{path}: rotary embedding on part of each head "
                              f"({key('rope.dimension_count')} of {head_dim} dims) is not supported")
    rope_scaling = None
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported (none, linear, Llama 3's)")
    types = {t.tensor_type for n, t in tensors.items() if len(t.shape) > 1}
    dtype = {Q.F16: "float16", Q.BF16: "bfloat16"}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    intermediate = count("feed_forward_length", nbytes, in_file)
    layers = count("block_count", len(tensors), f"the file holds {len(tensors)} tensors")
    kv_heads = count("attention.head_count_kv", heads, "the head count", heads)
    context = count("context_length", 2**32 - 1, "llama.cpp's limit", 4096)
    try:
        config = ModelConfig(
            architecture=HF_ARCHS[arch], vocab_size=vocab, hidden_size=hidden,
            intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, max_position_embeddings=context,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=arch == "llama" and "blk.0.attn_output.bias" in tensors,
            qkv_bias=arch == "qwen2", mlp_bias="blk.0.ffn_up.bias" in tensors,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=[eos, eot] if eot is not None and eos is not None and eot != eos else eos,
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
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
    import dataclasses

    factors = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))).reshape(-1)
    if torch.allclose(factors, torch.ones_like(factors)):
        return config
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = dataclasses.replace(config, rope_scaling=scaling)
    if factors.shape != (config.head_dim // 2,) or not torch.allclose(_rope_factors(config), factors, rtol=1e-4):
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS} holds rope frequency factors that are not Llama 3.1's "
                              f"scaling; they cannot be represented here")
    return config


# ---- tokenizer ---------------------------------------------------------------------------------------


def write_tokenizer(path: Path, out: Path, reader: gguf.GGUFReader | None = None) -> None:
    """`tokenizer.json` and `tokenizer_config.json` in `out`, rebuilt from the GGUF's vocabulary:
    `gpt2` as a byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names, `llama` as the
    SentencePiece-equivalent BPE (byte fallback, merges ranked by the pieces' scores) transformers uses."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    reader = reader or open_reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (gpt2 and llama are)")
    types = _field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # a repeated spelling keeps its first id
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind == "gpt2":
        if pre not in BPE_PRE_TOKENIZERS:
            raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: "
                                  f"{', '.join(BPE_PRE_TOKENIZERS)}")
        splits, ignore_merges = BPE_PRE_TOKENIZERS[pre]
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        default_bos = pre in ("llama-bpe", "llama3", "llama-v3")
    else:
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        tk = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, types), unk_token=unk,
                                  fuse_unk=True, byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        default_bos = True
    # Unused rows ("[PADn]", where the embedding outgrows the tokenizer) are special so decoding drops them, as
    # the original tokenizer, which has no such ids, did.
    special = {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.UNUSED}
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t in special])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED])
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", default_bos)) and ids["bos"] is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    # In the file too, not only in tokenizer_config.json: transformers' generic fast tokenizer reads only this.
    bos, eos = (tokens[ids[k]] if ids[k] is not None else "" for k in ("bos", "eos"))
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    tk.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(bos, ids["bos"])] * add_bos + [(eos, ids["eos"])] * add_eos)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))

    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "add_bos_token": add_bos, "add_eos_token": add_eos}
    for key, i in (("bos_token", ids["bos"]), ("eos_token", ids["eos"]), ("unk_token", ids["unknown"]),
                   ("pad_token", ids["padding"])):
        if i is not None and 0 <= i < len(tokens):
            cfg[key] = tokens[i]
    context = _field(reader, f"{_field(reader, 'general.architecture')}.context_length")
    if context:
        cfg["model_max_length"] = int(context)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the pair whose joined piece scores highest; as ranked merges that is every
    split of a normal piece into two known pieces, best joined score first (ties: longer left, longer right)."""
    normal = gguf.TokenType.NORMAL
    ids = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    found = []
    for i, piece in enumerate(tokens):
        if types[i] != normal:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-scores[i], -len(left), -len(right), i, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def tokenizer_dir(path: Path) -> Path:
    """A model-less dir with the tokenizer files of a GGUF (and its stop tokens), built once per file version
    in the store's cache, so `LLM.load("file.gguf")` gets a `Tokenizer` like any model dir's."""
    from llmasos.checkpoints.hf import write_generation_config
    from llmasos.checkpoints.store import atomic_dir, home

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = home() / "cache" / "gguf-tokenizers" / f"{path.stem}-{key}"
    if not final.exists():
        config, _ = read_gguf(path)
        with atomic_dir(final, replace=True) as tmp:
            write_tokenizer(path, tmp)
            write_generation_config(config, tmp)
    return final
