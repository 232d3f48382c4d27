"""The inference engine: KV cache, sampling, continuous batching, streaming; the `LLM` API."""

from llmasos.inference.engine import Completion, Engine, RequestOutput
from llmasos.inference.llm import LLM
from llmasos.inference.sampling import SamplingParams
from llmasos.inference.structured import StructuredOutputs

__all__ = ["Completion", "Engine", "LLM", "RequestOutput", "SamplingParams", "StructuredOutputs"]
