"""One `Tokenizer` over Hugging Face `tokenizer.json` and SentencePiece `tokenizer.model`.

Special tokens and BOS/EOS behaviour come from the checkpoint's `tokenizer_config.json`,
`special_tokens_map.json` and `config.json`, following transformers' rules so that our ids
equal `AutoTokenizer`'s.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmasos.errors import CheckpointError
from llmasos.tokenization.chat import BUILTIN_TEMPLATES, load_chat_template, render_chat

# What a model dir holds of its tokenizer: the files a `Tokenizer` and transformers' AutoTokenizer read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` has into `dst` (none onto itself); returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores tokens as strings or as serialised AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


class Tokenizer:
    """Encode, decode and chat-template rendering for one model dir.

    kind is "tokenizers" (a `tokenizer.json`) or "sentencepiece" (a `tokenizer.model`).
    """

    def __init__(self, path: Path | str):
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            raise CheckpointError(
                f"{path}: a GGUF file keeps its vocabulary inside; open the tokenizer files "
                f"rebuilt from it (llmasos.checkpoints.gguf_vocab.tokenizer_source)"
            )
        self.dir = path if path.is_dir() else path.parent
        cfg = _read_json(self.dir / "tokenizer_config.json")
        for key, value in _read_json(self.dir / "special_tokens_map.json").items():
            cfg.setdefault(key, value)
        model_cfg = _read_json(self.dir / "config.json")
        self.config = cfg
        json_file = path if path.is_file() and path.suffix == ".json" else self.dir / "tokenizer.json"
        sp_file = path if path.is_file() and path.suffix == ".model" else self.dir / "tokenizer.model"
        if json_file.exists():
            self._load_tokenizers(json_file)
        elif sp_file.exists():
            self._load_sentencepiece(sp_file)
        else:
            raise CheckpointError(f"{self.dir}: no tokenizer (tokenizer.json or tokenizer.model)")

        self.bos_token = _token_str(cfg.get("bos_token")) or self._id_token(model_cfg.get("bos_token_id"))
        self.eos_token = _token_str(cfg.get("eos_token")) or self._id_token(model_cfg.get("eos_token_id"))
        self.pad_token = _token_str(cfg.get("pad_token"))
        self.unk_token = _token_str(cfg.get("unk_token"))
        self.bos_id = self.token_to_id(self.bos_token)
        self.eos_id = self.token_to_id(self.eos_token)
        self.pad_id = self.token_to_id(self.pad_token)
        self._stop_ids = {self.eos_id} if self.eos_id is not None else set()
        template = load_chat_template(self.dir, cfg)
        self.has_chat_template = template is not None
        if template is None:  # a built-in format: Llama 3's when its header tokens exist, else Llama 2's
            llama3 = self.token_to_id("<|start_header_id|>") is not None
            template = BUILTIN_TEMPLATES["llama3" if llama3 else "llama2"]
            if llama3 and self.token_to_id("<|eot_id|>") is not None:
                self._stop_ids.add(self.token_to_id("<|eot_id|>"))
        self.chat_template = template
        gen = _read_json(self.dir / "generation_config.json").get("eos_token_id", model_cfg.get("eos_token_id"))
        for i in gen if isinstance(gen, list) else [gen]:
            if isinstance(i, int):
                self._stop_ids.add(i)

    # ---- back ends --------------------------------------------------------

    def _load_tokenizers(self, file: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import processors

        try:
            self._tk = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot be read as a tokenizers file: {e}") from None
        self.kind = "tokenizers"
        self._sp = None
        cfg = self.config
        # transformers rebuilds the post-processor from add_bos_token/add_eos_token when either is given
        # (or when the file has none); otherwise the file's own post-processor decides.
        if "add_bos_token" in cfg or "add_eos_token" in cfg or self._tk.post_processor is None:
            add_bos, add_eos = bool(cfg.get("add_bos_token", False)), bool(cfg.get("add_eos_token", False))
            bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
            add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
            single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
            pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
            special = [(t, self._tk.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
            self._tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
        self._special_ids = {t.content: i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}

    def _load_sentencepiece(self, file: Path) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(file))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError for non-models
            raise CheckpointError(f"{file}: cannot be read as a SentencePiece model: {e}") from None
        self.kind = "sentencepiece"
        self._sp, self._tk = sp, None
        cfg = self.config
        self._add_bos = bool(cfg.get("add_bos_token", True))
        self._add_eos = bool(cfg.get("add_eos_token", False))
        self._legacy = bool(cfg.get("legacy", False))
        specials = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)}
        for i, tok in (cfg.get("added_tokens_decoder") or {}).items():
            if tok.get("special", False):
                specials[tok["content"]] = int(i)
        specials.pop("", None)
        self._special_ids = specials
        pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if pattern else None

    # ---- vocabulary -------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True) if self._tk else self._sp.GetPieceSize()

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest piece in the vocabulary, in characters: no token stands for more text than this
        (byte-level and SentencePiece pieces are at least as long as the text they decode to)."""
        if self._tk is not None:
            return max(map(len, self._tk.get_vocab(with_added_tokens=True)), default=1)
        return max((len(self._sp.IdToPiece(i)) for i in range(self._sp.GetPieceSize())), default=1)

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self._tk is not None:
            return self._tk.token_to_id(token)
        i = self._special_ids.get(token, self._sp.PieceToId(token))
        return None if i == self._sp.unk_id() and token != self._sp.IdToPiece(i) else i

    def _id_token(self, i: Any) -> str | None:
        if isinstance(i, list):
            i = i[0] if i else None
        if not isinstance(i, int):
            return None
        return self._tk.id_to_token(i) if self._tk is not None else self._sp.IdToPiece(i)

    @property
    def backend(self):
        """The library object underneath: a `tokenizers.Tokenizer`, or a `sentencepiece.SentencePieceProcessor`."""
        return self._tk if self._tk is not None else self._sp

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids.values())

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end generation: EOS and any extra ones from generation_config.json."""
        return set(self._stop_ids)

    # ---- encode / decode --------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with `add_special_tokens`, BOS/EOS as the checkpoint asks (as transformers does)."""
        if self._tk is not None:  # the batch call without offsets: twice as fast, and it lets other threads run
            return self._tk.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        ids: list[int] = []
        parts = self._special_re.split(text) if self._special_re else [text]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._special_ids[part])
            elif part:
                # transformers' Metaspace adds "▁" only at the very start, and not before an existing space.
                ids.extend(self._sp_encode(part, prefix=k == 0 and not part.startswith(" ")))
        if add_special_tokens:
            if self._add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self._add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def _sp_encode(self, text: str, prefix: bool) -> list[int]:
        """SentencePiece ids; without `prefix`, no dummy "▁" is prepended (text that follows a special
        token, as transformers' non-legacy Llama tokenizer does): encode after a throw-away unk and drop it."""
        if prefix or self._legacy:
            return self._sp.EncodeAsIds(text)
        unk = self._sp.IdToPiece(self._sp.unk_id())
        return self._sp.EncodeAsIds(unk + text)[len(self._sp.EncodeAsIds(unk)) :]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if self._tk is not None:
            return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers' Llama decoder: "▁" -> " ", byte pieces fused to UTF-8, one leading space stripped.
        sp, special = self._sp, self.special_ids
        out = bytearray()
        for i in ids:
            if i in special:
                if not skip_special_tokens:
                    out += sp.IdToPiece(i).encode()
            elif sp.IsByte(i):
                out.append(int(sp.IdToPiece(i)[3:5], 16))
            else:
                out += sp.IdToPiece(i).replace("\u2581", " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    # ---- chat --------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs: Any
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template (or the built-in one), as transformers does."""
        text = render_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            unk_token=self.unk_token,
            pad_token=self.pad_token,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- saving -------------------------------------------------------------

    def save(self, out_dir: Path | str) -> None:
        """Copy the tokenizer files into a model dir."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        copy_tokenizer_files(self.dir, Path(out_dir))


class StreamDecoder:
    """Incremental detokenisation: text deltas that never split a multi-byte character.

    Decodes a short window of recent tokens twice (with and without the newest ones) and emits
    the difference, so tokenizers that drop a leading space or merge byte tokens stay exact.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window that gives context to the next decode
        self.read = 0  # tokens up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character is emitted as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], self.skip)
        text = decode(self.ids[self.prefix :], self.skip)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or the newest bytes are half a character
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]
