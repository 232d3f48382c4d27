"""Tokenizers (HF `tokenizer.json`, SentencePiece `tokenizer.model`) and chat templates."""

from llmasos.tokenization.tokenizer import StreamDecoder, Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
