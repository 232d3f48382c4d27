"""Any model we read (HF or Meta dir, GGUF file, LoRA adapter), written for other tools: an HF dir that
transformers loads, or one GGUF file that llama.cpp and Ollama load, with an Ollama `Modelfile` beside it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from llmasos.checkpoints.gguf import AUTO_DTYPES, EXPORT_TYPES, write_gguf
from llmasos.checkpoints.gguf_vocab import tokenizer_source, write_vocab
from llmasos.checkpoints.hf import save_model
from llmasos.checkpoints.load import build_meta_model, check_entries, load_model, open_checkpoint
from llmasos.checkpoints.ollama import modelfile_path, write_modelfile, written_by_export
from llmasos.checkpoints.pooling import copy_pooling, read_pooling
from llmasos.errors import LLMasOSError
from llmasos.outputs import check_output, output_dir
from llmasos.tokenization import Tokenizer

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_hf(model_dir: Path, out_dir: Path, dtype: str = "auto", force: bool = False) -> Path:
    """Any model we read (HF or Meta dir, GGUF file) as an HF dir transformers loads, in `dtype`
    (auto: as stored; a GGUF's quantized tensors come out dequantised). `out_dir` may replace a dir
    `llmasos export` wrote, anything else only with `force`; never the model itself."""
    model_dir = Path(model_dir)
    if dtype != "auto" and dtype not in HF_DTYPES:
        raise LLMasOSError(
            f"dtype {dtype!r} cannot be written to an HF dir; use auto, {', '.join(HF_DTYPES)} "
            f"(q8_0 and q4_0 are GGUF types: --format gguf)"
        )
    with output_dir(Path(out_dir), [model_dir], force, "llmasos export") as tmp:
        model = load_model(model_dir, HF_DTYPES.get(dtype))
        save_model(model, tmp, tokenizer_dir=tokenizer_source(model_dir))
        copy_pooling(model_dir, tmp, model.config.hidden_size)
    return Path(out_dir)


def export_gguf(model_dir: Path | str, out: Path | str, dtype: str = "auto", force: bool = False, progress: bool = True) -> Path:
    """Write the model in `model_dir` as one GGUF file that llama.cpp and Ollama load; returns its path.

    out: a `.gguf` path, or a directory to write `<model>-<dtype>.gguf` into. dtype: auto (as stored),
    f32, f16, bf16, q8_0 or q4_0. The file is written under a temporary name and renamed when complete;
    an Ollama `Modelfile` is written beside it.
    """
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
    tokenizer = Tokenizer(tokenizer_source(model_dir))
    vocab = partial(write_vocab, tokenizer=tokenizer, config=config)
    context = write_gguf(out, config, entries, dtype, name, vocab, progress, pooling=read_pooling(model_dir))
    stops = [tokenizer.decode([i], skip_special_tokens=False) for i in sorted(tokenizer.stop_ids)]
    write_modelfile(out, tokenizer.chat_template, stops, context)
    return out
