"""ONNX export: the decoder with its KV cache as graph inputs and outputs, for onnxruntime.

The graph has the layout optimum and onnxruntime-genai use: `input_ids`, `attention_mask`
[batch, past + seq], `position_ids` and `past_key_values.{i}.key/value` [batch, kv_heads, past,
head_dim] in; `logits` and `present.{i}.key/value` (past and new keys together) out. A
`genai_config.json` describes it to onnxruntime-genai.

Our `Transformer` writes a preallocated cache in place, which a graph cannot express. The export
runs the same modules and weights (`Block`, `Attention`, rotary) with a cache that concatenates
instead, so nothing of the architecture is written twice. It uses the dynamo exporter
(`torch.export`): the TorchScript one cannot convert `scaled_dot_product_attention` with
`enable_gqa`, which our attention uses for grouped-query models, and is deprecated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmasos.checkpoints.hf import write_generation_config
from llmasos.checkpoints.load import load_model
from llmasos.checkpoints.paths import resolve
from llmasos.errors import LLMasOSError
from llmasos.extras import require
from llmasos.models.config import MODEL_TYPES, ModelConfig
from llmasos.models.llama import ForwardBatch, Transformer
from llmasos.outputs import check_inputs, output_dir
from llmasos.tokenization import copy_tokenizer_files

DTYPES = {
    "float32": torch.float32,
    "f32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "f16": torch.float16,
    "fp16": torch.float16,
}


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")
    ]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class ConcatCache:
    """Stands in for `KVCache` during one forward pass: a layer attends to its past keys and values
    with the new ones appended, and that concatenation is the layer's `present` output."""

    def __init__(self, past: Sequence[Tensor]):
        self.past = past
        self.present: list[Tensor] = []

    def update(self, layer: int, batch: ForwardBatch, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.cat((self.past[2 * layer], k), dim=2)
        v = torch.cat((self.past[2 * layer + 1], v), dim=2)
        self.present += [k, v]
        return k, v


class OnnxDecoder(nn.Module):
    """A `Transformer`'s forward pass with the cache passed in and out: what is exported."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        s, total = input_ids.shape[1], attention_mask.shape[1]
        keys = torch.arange(total, device=input_ids.device)
        query = (torch.arange(s, device=input_ids.device) + (total - s))[:, None]  # each new token's index in the sequence
        visible = keys <= query
        if model.config.sliding_window is not None:
            visible &= keys > query - model.config.sliding_window
        # Padding is hidden from every query; a padding query still sees itself, so no softmax row is empty (NaN).
        mask = visible & ((attention_mask[:, None, :] != 0) | (keys == query))
        x = model.model.embed_tokens(input_ids)
        cos, sin = model.rotary(position_ids, x.dtype)
        cache = ConcatCache(past)
        batch = ForwardBatch(
            cos=cos,
            sin=sin,
            input_pos=position_ids,
            mask=mask[:, None],
            causal=False,
            kv_len=total,
            start=None,
            rows=None,
            cache=cache,
            row0=0,
        )
        for block in model.model.layers:
            x = block(x, batch)
        return (model.lm_head(model.model.norm(x)), *cache.present)


def genai_config(config: ModelConfig) -> dict[str, Any]:
    """onnxruntime-genai's description of the graph. The cache is not a shared buffer: each
    `present` is its `past` with the new tokens appended (past_present_share_buffer false)."""
    eos = config.eos_token_ids
    return {
        "model": {
            "type": MODEL_TYPES[config.architecture],
            "vocab_size": config.vocab_size,
            "context_length": config.max_position_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else (eos or [0])[0],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": config.max_position_embeddings,
            "min_length": 0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "past_present_share_buffer": False,
        },
    }


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and log lines: they concern its internals, nothing a user can act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model_path: Path | str, out_dir: Path, *, dtype: str = "float32", force: bool = False) -> Path:
    """Write `model.onnx` (weights in `model.onnx.data` above 1.5 GB), `genai_config.json`, the model's config,
    generation config and tokenizer files into `out_dir`; returns `model.onnx`'s path. `out_dir` may replace
    a dir `llmasos export` wrote, anything else only with `force`; never the model itself.

    model_path: a store name or a model dir. dtype: float32 or float16 (onnxruntime has few bf16 kernels)."""
    if dtype not in DTYPES:
        raise LLMasOSError(f"ONNX export: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    with output_dir(out_dir, [model_path], force, "llmasos export") as tmp:
        path = resolve(model_path)
        check_inputs(out_dir, [path])  # a store name's dir, which the check above could not see
        _export(path, tmp, dtype)
    return out_dir / "model.onnx"


def _export(path: Path, out_dir: Path, dtype: str) -> None:
    """The export itself, writing into `out_dir` (a fresh temporary dir)."""
    require("export", "ONNX export")
    from onnxscript import ir

    model = load_model(path, dtype=DTYPES[dtype])
    config = model.config
    n = config.num_hidden_layers
    # Sample sizes all differ and exceed 1, so that torch.export keeps every axis symbolic.
    batch, seq, past = 2, 3, 4
    sample = (
        torch.zeros(batch, seq, dtype=torch.int64),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq),
        *(torch.zeros(batch, config.num_key_value_heads, past, config.head_dim, dtype=DTYPES[dtype]) for _ in range(2 * n)),
    )  # distinct tensors: torch.export would merge inputs that alias
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: torch.export.Dim.AUTO},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in range(2 * n)),
    }
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            OnnxDecoder(model).eval(),
            sample,
            input_names=input_names(n),
            output_names=output_names(n),
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    mask = program.model.graph.inputs[1]  # its length is past + seq, which torch.export cannot be told
    mask.shape = ir.Shape(["batch", "past + seq"])
    program.save(out_dir / "model.onnx")
    stored = dataclasses.replace(config, dtype=str(DTYPES[dtype]).removeprefix("torch."))
    (out_dir / "config.json").write_text(stored.to_json() + "\n")
    (out_dir / "genai_config.json").write_text(json.dumps(genai_config(config), indent=2) + "\n")
    if (path / "generation_config.json").exists():
        shutil.copy2(path / "generation_config.json", out_dir)
    else:
        write_generation_config(config, out_dir)
    copy_tokenizer_files(path, out_dir)
