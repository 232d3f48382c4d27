"""The local model store, `$LLMASOS_HOME/models/NAME/`: one Hugging Face dir per model.

Everything enters through `pull`, which writes into a temporary dir beside the target and
renames it into place, so a failed or interrupted pull leaves nothing half-written. What a MODEL
argument names (`resolve`) and what the store holds (`models_dir`, `stored_models`) are looked up in
`paths`, below the formats, and re-exported here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from llmasos.checkpoints.gguf_vocab import write_tokenizer
from llmasos.checkpoints.hf import write_generation_config
from llmasos.checkpoints.load import build_meta_model, check_entries, open_checkpoint, uniform_dtype
from llmasos.checkpoints.meta import is_meta_dir
from llmasos.checkpoints.paths import NAME, models_dir, resolve, stored_models
from llmasos.checkpoints.pooling import POOLING_FILES, copy_pooling
from llmasos.checkpoints.weights import load_tensor, save_safetensors_shards
from llmasos.errors import CheckpointError, LLMasOSError
from llmasos.models.zoo import hf_id
from llmasos.outputs import atomic_dir
from llmasos.tokenization import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files

__all__ = [
    "default_name",
    "dir_size",
    "download",
    "import_checkpoint",
    "models_dir",
    "pull",
    "resolve",
    "stored_models",
    "write_meta_tokenizer_config",
]

# Checked with fullmatch: `$` also matches before a trailing newline, which let "evil\n" in.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
    *POOLING_FILES,  # a sentence-transformers model's pooling, which embeddings use
]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def default_name(source: str) -> str:
    name = Path(source.rstrip("/")).name if not HUB_ID.fullmatch(source) or Path(source).exists() else source.split("/")[-1]
    name = name.removesuffix(".gguf")
    return re.sub(r"[^\w.+-]", "-", name).lower() or "model"


def download(repo_id: str, dest: Path) -> Path:
    """A hub checkpoint's config, safetensors and tokenizer files, through `huggingface_hub`."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_dir=dest))
    except Exception as e:  # offline, unknown repo, gated repo, ...: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMasOSError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({reason}). Without network access, "
            f"download the model on another machine and run `llmasos pull /path/to/model-dir`"
        ) from None


def pull(source: str, name: str | None = None, force: bool = False, progress: bool = True) -> Path:
    """Import a local HF dir, a Meta checkpoint dir, a GGUF file, a zoo name or a hub id into the store."""
    name = name or default_name(source)
    if not NAME.fullmatch(name):
        raise LLMasOSError(f"invalid model name {name!r}: use letters, digits, '.', '-', '_' or '+'")
    final = models_dir() / name
    path = Path(source).expanduser()
    if not path.exists():
        repo = hf_id(source) or (source if HUB_ID.fullmatch(source) else None)
        if repo is None:
            raise LLMasOSError(f"{source}: no such file or directory, and not a hub id (owner/name) or zoo name")
        with atomic_dir(final, replace=force) as tmp:
            download(repo, tmp / ".download")
            import_checkpoint(tmp / ".download", tmp, progress)
            shutil.rmtree(tmp / ".download")
        return final
    with atomic_dir(final, replace=force) as tmp:
        import_checkpoint(path, tmp, progress)
    return final


def import_checkpoint(src: Path, out: Path, progress: bool = True) -> None:
    """Write `src` (HF or Meta dir, GGUF file) into `out` as a safetensors HF dir, checking every tensor's shape.

    A GGUF's quantized tensors are stored dequantised, in float32 (exact); its tokenizer is rebuilt from
    the vocabulary."""
    config, entries = open_checkpoint(src)
    check_entries(build_meta_model(config), entries, src)
    gguf_file = src.is_file() and src.suffix == ".gguf"
    if src.is_dir() and not is_meta_dir(src) and all(e.tensor is None for e in entries.values()):
        # Already safetensors: copy the files as they are.
        for f in sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json")):
            shutil.copy2(f, out / f.name)
        for f in ("config.json", "generation_config.json"):
            if (src / f).exists():
                shutil.copy2(src / f, out / f)
    else:
        dtype = uniform_dtype(config, entries)
        state = {n: e.tensor if e.tensor is not None and dtype is None else load_tensor(e, dtype, n) for n, e in entries.items()}
        save_safetensors_shards(state, out)
        (out / "config.json").write_text(config.to_json() + "\n")
    if not (out / "generation_config.json").exists():
        write_generation_config(config, out)
    copy_pooling(src, out, config.hidden_size)  # the pooling embeddings use, if the source names one
    if gguf_file:
        write_tokenizer(src, out)
    else:
        tokenizer_src = src if any((src / f).exists() for f in ("tokenizer.json", "tokenizer.model")) else src.parent
        copy_tokenizer_files(tokenizer_src, out)
    if is_meta_dir(src) and (out / "tokenizer.model").exists() and not (out / "tokenizer_config.json").exists():
        write_meta_tokenizer_config(out)
    if any((out / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        Tokenizer(out)  # refuse a tokenizer we cannot read now, not at first use


def write_meta_tokenizer_config(out: Path) -> None:
    """Meta dirs ship only `tokenizer.model`; give it the Llama special tokens transformers expects."""
    try:
        import sentencepiece as spm

        spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    except Exception:
        raise CheckpointError(
            f"{out / 'tokenizer.model'}: not a SentencePiece model (Llama 3's tiktoken tokenizer is not supported "
            f"in Meta dirs; pull the Hugging Face version of the model instead)"
        ) from None
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
