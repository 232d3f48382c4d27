"""`LLM`: the Python API. A model, its tokenizer and one engine that every call runs on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch

from llmasos.checkpoints.gguf_vocab import tokenizer_source
from llmasos.checkpoints.load import load_model, open_checkpoint
from llmasos.checkpoints.store import resolve
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.inference.engine import Engine, RequestOutput
from llmasos.inference.sampling import SamplingParams
from llmasos.inference.tools import plan_tools, template_messages
from llmasos.models.fast import set_inference_dtypes, use_gemv_kernels
from llmasos.models.quantize import quantize_model
from llmasos.tokenization import Tokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, stored: str, device: str) -> torch.dtype:
    """ "auto" (or None) keeps the checkpoint's dtype, except fp16 on a CPU, which becomes bf16
    (this CPU has no fast fp16 matmul)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = stored
    if dtype not in DTYPES:
        raise LLMasOSError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    chosen = DTYPES[dtype]
    if chosen == torch.float16 and torch.device(device).type == "cpu":
        chosen = torch.bfloat16
    return chosen


class LLM:
    """Load once, then `generate`, `stream` or `chat`. `.model` is the nn.Module, `.tokenizer` the tokenizer."""

    def __init__(
        self,
        model,
        tokenizer,
        path: Path | None = None,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        cache_budget: int | None = None,
    ):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, cache_budget=cache_budget)

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        dtype: str | torch.dtype | None = "auto",
        device: str = "cpu",
        quantize: str | None = None,
        compile: bool = False,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        progress: bool = False,
        kernels: bool = True,
        cache_budget: int | None = None,
    ) -> LLM:
        """A stored model's name or a model dir. quantize: None, "int8" or "int4" (weight-only).

        max_seq_len: the longest sequence (prompt + generated tokens), at most the model's context.
        cache_budget: bytes the KV cache may take (None: no limit); it caps max_seq_len too.
        kernels: on a CPU, decode with the hand-written kernels (`llmasos.kernels`).
        compile: torch.compile the model instead (stock PyTorch ops; the first calls compile for minutes)."""
        path = resolve(name_or_path)
        config, _ = open_checkpoint(path)
        model = load_model(path, dtype=resolve_dtype(dtype, config.dtype, device), device=device, progress=progress)
        if quantize is not None:
            quantize_model(model, quantize)
        fast = kernels and not compile and torch.device(device).type == "cpu" and use_gemv_kernels(model)
        set_inference_dtypes(model, fast)
        if compile:
            model.compile_decode()
        return cls(
            model,
            Tokenizer(tokenizer_source(path)),
            path,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            cache_budget=cache_budget,
        )

    @property
    def config(self):
        return self.model.config

    def generate(
        self, prompts: str | list[str] | list[list[int]] | list[int], params: SamplingParams | None = None, progress: bool = False
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string or a list of token ids."""
        params = params or SamplingParams()
        one = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        batch = cast(list[str | list[int]], [prompts] if one else prompts)
        outputs = self.engine.run([self.engine.add(p, params) for p in batch], progress=progress)
        failed = [o for o in outputs if o.error is not None]
        if failed:
            raise LLMasOSError(f"generation failed for {len(failed)} of {len(outputs)} prompts: {failed[0].error}")
        return outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of the (first) sample as they are decoded. Closing the iterator cancels the request."""
        output = self.engine.add(prompt, params or SamplingParams())
        try:
            while not output.finished:
                for delta in self.engine.step():
                    if delta.request is output and delta.index == 0 and delta.text:
                        yield delta.text
            if output.error is not None:
                raise LLMasOSError(f"generation failed: {output.error}")
        finally:
            if not output.finished:
                self.engine.abort(output.request_id)

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
    ) -> RequestOutput:
        """Answer a conversation (OpenAI-shaped messages, `tool` messages and assistant `tool_calls` included)
        rendered with the model's chat template.

        tools: OpenAI's list of functions, shown to the model through its template. tool_choice: "auto" (the
        default: the model may call them), "required" or {"type": "function", "function": {"name": ...}} (it
        must: decoding is constrained to a well-formed call whose arguments match the schema), or "none".
        A sample's calls are in `outputs[i].tool_calls` (`ToolCall`: id, name, arguments as JSON text), its
        `text` is what it said besides, and its finish_reason is "tool_calls"."""
        plan = plan_tools(self.tokenizer, tools, tool_choice, parallel_tool_calls)
        params = params or SamplingParams()
        if plan is not None and plan.structured is not None:
            if params.structured is not None:
                raise InvalidRequestError("tool_choice required (or a named function) cannot be combined with structured outputs")
            params = replace(params, structured=plan.structured)
        out = self.generate([self.chat_prompt(messages, plan.tools if plan else None)], params)[0]
        if plan is not None:
            for completion in out.outputs:
                plan.read(completion, self.tokenizer)
        return out

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt's token ids: `messages` (and `tools`, if any) rendered with the model's chat template."""
        return self.tokenizer.apply_chat_template(
            template_messages(messages), add_generation_prompt=True, tokenize=True, tools=tools
        )
