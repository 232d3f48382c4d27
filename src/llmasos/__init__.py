"""LLMasOS: one toolkit for the whole life of a LLaMA-family model."""

__version__ = "0.1.0"
