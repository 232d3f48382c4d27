"""A GGUF's vocabulary and tokenizer files: a `Tokenizer` written as llama.cpp's `tokenizer.ggml.*` keys, and
those keys rebuilt as a `tokenizer.json` + `tokenizer_config.json` that transformers and `Tokenizer` read.

A GGUF file carries no tokenizer files, so whoever opens one for its tokenizer goes through
`tokenizer_source`, which rebuilds them once per file version in a cache dir.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from llmasos.checkpoints.gguf import open_reader, read_field, read_gguf
from llmasos.checkpoints.hf import write_generation_config
from llmasos.errors import CheckpointError
from llmasos.models.config import ModelConfig
from llmasos.outputs import atomic_dir, home

if TYPE_CHECKING:
    from llmasos.tokenization import Tokenizer

# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre`: the regexes llama.cpp splits with, in order, and
# whether a word found whole in the vocabulary skips the merges (llama.cpp's `ignore_merges`).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
BPE_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    "llama-bpe": ([LLAMA3_SPLIT], True),
    "llama3": ([LLAMA3_SPLIT], True),
    "llama-v3": ([LLAMA3_SPLIT], True),
    "qwen2": ([QWEN2_SPLIT], False),
    "gpt-2": ([GPT2_SPLIT], False),
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
}
EXPORT_PRE_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", GPT2_SPLIT: "gpt-2"}  # Split regex -> name


# ---- Tokenizer -> GGUF ---------------------------------------------------------------------------------


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
        raise CheckpointError(
            f"{tokenizer.dir}: the tokenizer has {len(tokens)} tokens, more than the model's vocab_size {config.vocab_size}"
        )
    writer.add_token_list(_pad(tokens, config.vocab_size, None))
    writer.add_token_types(_pad(types, config.vocab_size, gguf.TokenType.UNUSED))
    for key, i in (
        ("bos", tokenizer.bos_id),
        ("eos", tokenizer.eos_id),
        ("pad", tokenizer.pad_id),
        ("unk", tokenizer.token_to_id(tokenizer.unk_token)),
    ):
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
        types.append(
            gguf.TokenType.UNKNOWN
            if sp.IsUnknown(i)
            else gguf.TokenType.CONTROL
            if sp.IsControl(i)
            else gguf.TokenType.UNUSED
            if sp.IsUnused(i)
            else gguf.TokenType.BYTE
            if sp.IsByte(i)
            else gguf.TokenType.NORMAL
        )
    for key, tok in sorted((tokenizer_config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        i = int(key)
        tokens, scores, types = _pad(tokens, i + 1, None), _pad(scores, i + 1, -1000.0), _pad(types, i + 1, gguf.TokenType.UNUSED)
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
        raise CheckpointError(f"{file}: a {model.get('type')} tokenizer cannot be written to GGUF (BPE or SentencePiece only)")
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


# ---- GGUF -> tokenizer files ---------------------------------------------------------------------------


def write_tokenizer(path: Path, out: Path, reader: gguf.GGUFReader | None = None) -> None:
    """`tokenizer.json` and `tokenizer_config.json` in `out`, rebuilt from the GGUF's vocabulary:
    `gpt2` as a byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names, `llama` as the
    SentencePiece-equivalent BPE (byte fallback, merges ranked by the pieces' scores) transformers uses."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    reader = reader or open_reader(path)
    kind = read_field(reader, "tokenizer.ggml.model")
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (gpt2 and llama are)")
    types = read_field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # a repeated spelling keeps its first id
    ids = {k: read_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    pre = read_field(reader, "tokenizer.ggml.pre", "default")
    if kind == "gpt2":
        if pre not in BPE_PRE_TOKENIZERS:
            raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(BPE_PRE_TOKENIZERS)}")
        splits, ignore_merges = BPE_PRE_TOKENIZERS[pre]
        merges = [tuple(m.split(" ", 1)) for m in read_field(reader, "tokenizer.ggml.merges", [])]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tk.decoder = decoders.ByteLevel()
        default_bos = pre in ("llama-bpe", "llama3", "llama-v3")
    else:
        scores = read_field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        tk = Tokenizer(
            models.BPE(
                vocab=vocab, merges=_merges_from_scores(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True
            )
        )
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tk.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        default_bos = True
    # Unused rows ("[PADn]", where the embedding outgrows the tokenizer) are special so decoding drops them, as
    # the original tokenizer, which has no such ids, did.
    special = {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.UNUSED}
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in special])
    tk.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED]
    )
    add_bos = bool(read_field(reader, "tokenizer.ggml.add_bos_token", default_bos)) and ids["bos"] is not None
    add_eos = bool(read_field(reader, "tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    # In the file too, not only in tokenizer_config.json: transformers' generic fast tokenizer reads only this.
    bos, eos = (tokens[ids[k]] if ids[k] is not None else "" for k in ("bos", "eos"))
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    tk.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(bos, ids["bos"])] * add_bos + [(eos, ids["eos"])] * add_eos
    )
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    for key, i in (
        ("bos_token", ids["bos"]),
        ("eos_token", ids["eos"]),
        ("unk_token", ids["unknown"]),
        ("pad_token", ids["padding"]),
    ):
        if i is not None and 0 <= i < len(tokens):
            cfg[key] = tokens[i]
    context = read_field(reader, f"{read_field(reader, 'general.architecture')}.context_length")
    if context:
        cfg["model_max_length"] = int(context)
    template = read_field(reader, "tokenizer.chat_template")
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


def tokenizer_source(path: Path | str) -> Path:
    """Where the tokenizer of a model path is: a GGUF file's rebuilt dir (`tokenizer_dir`), else the path."""
    path = Path(path)
    return tokenizer_dir(path) if path.is_file() and path.suffix == ".gguf" else path
