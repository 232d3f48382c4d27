"""Tokenizers (HF `tokenizer.json`, SentencePiece `tokenizer.model`) and chat templates."""

from llmasos.tokenization.tokenizer import TOKENIZER_FILES, StreamDecoder, Tokenizer, copy_tokenizer_files

__all__ = ["TOKENIZER_FILES", "StreamDecoder", "Tokenizer", "copy_tokenizer_files"]
