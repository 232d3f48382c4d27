"""`LLM`: the Python API. A model, its tokenizer and one engine that every call runs on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

from llmasos.checkpoints.gguf_vocab import tokenizer_source
from llmasos.checkpoints.load import load_model, open_checkpoint
from llmasos.checkpoints.store import resolve
from llmasos.errors import LLMasOSError
from llmasos.inference.engine import Engine, RequestOutput
from llmasos.inference.sampling import SamplingParams
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
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int | None = None,
    ):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.engine = Engine(
            model,
            tokenizer,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            cache_budget=cache_budget,
            enable_prefix_caching=enable_prefix_caching,
            max_num_batched_tokens=max_num_batched_tokens,
        )

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
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int | None = None,
    ) -> LLM:
        """A stored model's name or a model dir. quantize: None, "int8" or "int4" (weight-only).

        max_seq_len: the longest sequence (prompt + generated tokens), at most the model's context.
        cache_budget: bytes the KV cache may take (None: no limit); it caps max_seq_len too.
        enable_prefix_caching: keep prompts' KV for later prompts that start alike (a chat's next turn).
        max_num_batched_tokens: tokens computed per engine step (None: whole prompts); a smaller budget cuts
        long prompts into chunks, so that running streams keep going while they are prefilled.
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
            enable_prefix_caching=enable_prefix_caching,
            max_num_batched_tokens=max_num_batched_tokens,
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

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        """Answer a conversation rendered with the model's chat template."""
        return self.generate([self.chat_prompt(messages)], params)[0]

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
