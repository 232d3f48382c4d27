"""Training a byte-level BPE tokenizer (the `tokenizers` library) that transformers' AutoTokenizer loads.

Llama 3's conventions: byte-level pre-tokenization (no unknown tokens, any text round-trips),
`<|begin_of_text|>` added in front of every encoding, and the header/end-of-turn tokens that the
built-in Llama 3 chat template uses, so a model trained on it can be chat-tuned later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llmasos.errors import LLMasOSError
from llmasos.outputs import output_dir
from llmasos.tokenization.chat import LLAMA3_TEMPLATE

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# GPT-2/Llama-3 style split: contractions, letters, single digits, punctuation runs, whitespace.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out: Path | str,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    progress: bool = True,
    inputs: Iterable[Path | str] = (),
    force: bool = False,
) -> Path:
    """Train on `texts` and write `tokenizer.json` + `tokenizer_config.json` into `out`.

    inputs: the files the texts come from, which `out` must not be or contain. `out` may replace a dir
    `llmasos tokenizer train` wrote, anything else only with `force`; it is checked before training."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise LLMasOSError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)"
        )
    out = Path(out)
    with output_dir(out, inputs, force, "llmasos tokenizer train") as tmp:
        _train(texts, vocab_size, tmp, min_frequency, model_max_length, progress)
    return out


def _train(texts: Iterable[str], vocab_size: int, out: Path, min_frequency: int, model_max_length: int, progress: bool) -> None:
    """The training itself, writing into `out` (a fresh temporary dir)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA3_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
