"""LLMasOS: one toolkit for the whole life of a LLaMA-family model.

`from llmasos import LLM, SamplingParams` imports torch on first use, not before, so the CLI stays fast.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputs"]


def __getattr__(name: str):
    if name in __all__:
        from llmasos import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'llmasos' has no attribute {name!r}")
