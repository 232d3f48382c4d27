"""`LLM`: the Python API. A model, its tokenizer and one engine that every call runs on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch

from llmasos.checkpoints.gguf_vocab import tokenizer_source
from llmasos.checkpoints.load import adapter_base, load_model, open_checkpoint
from llmasos.checkpoints.pooling import DEFAULT_POOLING, POOLINGS, read_pooling
from llmasos.checkpoints.store import resolve
from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.inference import adapters as lora
from llmasos.inference.embedding import check_dimensions, shorten
from llmasos.inference.engine import Engine, RequestOutput
from llmasos.inference.sampling import SamplingParams
from llmasos.inference.tools import plan_tools, template_messages
from llmasos.models.fast import set_inference_dtypes, use_gemv_kernels
from llmasos.models.lora import ADAPTER_CONFIG
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
    """Load once, then `generate`, `stream`, `chat` or `embed`. `.model` is the nn.Module, `.tokenizer` the tokenizer.

    LoRA adapters load beside the model unmerged (`load_adapter`) and each call names the one it runs with
    (`adapter=`); requests for different adapters share the engine's batches."""

    def __init__(
        self,
        model,
        tokenizer,
        path: Path | None = None,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        cache_budget: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int | str | None = None,
        pooling: str | None = None,
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
        if pooling is not None and pooling not in POOLINGS:
            raise LLMasOSError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        self._pooling = pooling

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
        max_num_batched_tokens: int | str | None = None,
        pooling: str | None = None,
    ) -> LLM:
        """A stored model's name or a model dir. quantize: None, "int8" or "int4" (weight-only).

        max_seq_len: the longest sequence (prompt + generated tokens), at most the model's context.
        cache_budget: bytes the KV cache may take (None: no limit); it caps max_seq_len too.
        enable_prefix_caching: keep prompts' KV for later prompts that start alike (a chat's next turn).
        max_num_batched_tokens: tokens computed per engine step (None: whole prompts); a smaller budget cuts
        long prompts into chunks, so that running streams keep going while they are prefilled; "auto": chunks
        that take about as long as the running streams' decode step (what `llmasos serve` uses).
        kernels: on a CPU, decode with the hand-written kernels (`llmasos.kernels`).
        compile: torch.compile the model instead (stock PyTorch ops; the first calls compile for minutes).
        pooling: how `embed` pools (mean, last, cls, max), instead of what the model's files name."""
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
            pooling=pooling,
        )

    @property
    def config(self):
        return self.model.config

    def generate(
        self,
        prompts: str | list[str] | list[list[int]] | list[int],
        params: SamplingParams | None = None,
        progress: bool = False,
        adapter: str | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string or a list of token ids. adapter: the name of a
        loaded LoRA adapter to generate with (None: the base model)."""
        params = params or SamplingParams()
        chosen = lora.find(self.model, adapter)
        outputs = self.engine.run([self.engine.add(p, params, adapter=chosen) for p in _batch(prompts)], progress=progress)
        failed = [o for o in outputs if o.error is not None]
        if failed:
            raise LLMasOSError(f"generation failed for {len(failed)} of {len(outputs)} prompts: {failed[0].error}")
        return outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, adapter: str | None = None) -> Iterator[str]:
        """Text deltas of the (first) sample as they are decoded. Closing the iterator cancels the request."""
        output = self.engine.add(prompt, params or SamplingParams(), adapter=lora.find(self.model, adapter))
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
        adapter: str | None = None,
    ) -> RequestOutput:
        """Answer a conversation (OpenAI-shaped messages, `tool` messages and assistant `tool_calls` included)
        rendered with the model's chat template.

        tools: OpenAI's list of functions, shown to the model through its template. tool_choice: "auto" (the
        default: the model may call them), "required" or {"type": "function", "function": {"name": ...}} (it
        must: decoding is constrained to a well-formed call whose arguments match the schema), or "none".
        A sample's calls are in `outputs[i].tool_calls` (`ToolCall`: id, name, arguments as JSON text), its
        `text` is what it said besides, and its finish_reason is "tool_calls". adapter: a loaded LoRA adapter's name."""
        plan = plan_tools(self.tokenizer, tools, tool_choice, parallel_tool_calls)
        params = params or SamplingParams()
        if plan is not None and plan.structured is not None:
            if params.structured is not None:
                raise InvalidRequestError("tool_choice required (or a named function) cannot be combined with structured outputs")
            params = replace(params, structured=plan.structured)
        out = self.generate([self.chat_prompt(messages, plan.tools if plan else None)], params, adapter=adapter)[0]
        if plan is not None:
            for completion in out.outputs:
                plan.read(completion, self.tokenizer)
        return out

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt's token ids: `messages` (and `tools`, if any) rendered with the model's chat template."""
        return self.tokenizer.apply_chat_template(
            template_messages(messages), add_generation_prompt=True, tokenize=True, tools=tools
        )

    # ---- embeddings ----

    @property
    def pooling(self) -> str:
        """How `embed` pools the final hidden states: as `LLM.load(pooling=...)` said, else as the model's files
        name it (a sentence-transformers Pooling config, a GGUF's pooling_type), else mean."""
        if self._pooling is None:
            source = self.path
            if source is not None and (source / ADAPTER_CONFIG).exists():
                source = adapter_base(source)
            self._pooling = (read_pooling(source) if source is not None else None) or DEFAULT_POOLING
        return self._pooling

    def embed(
        self,
        texts: str | list[str] | list[int] | list[list[int]],
        pooling: str | None = None,
        dimensions: int | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """Embeddings [len(texts), hidden] (fp32, CPU, each of unit length): the final hidden states of each text
        (a string or a list of token ids) pooled over its tokens (`pooling`, default `self.pooling`). Batched with
        whatever else the engine runs, prefill only. dimensions: keep the first this many values, renormalised."""
        check_dimensions(dimensions, self.config.hidden_size)
        request = self.engine.embedder.add(_batch(texts), pooling or self.pooling, lora.find(self.model, adapter))
        while not request.finished:
            self.engine.step()
        if request.error is not None:
            raise LLMasOSError(f"embedding failed: {request.error}")
        return shorten(torch.stack(cast(list[torch.Tensor], request.embeddings)), dimensions)

    # ---- LoRA adapters ----

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the PEFT LoRA adapter dir `path` (what `llmasos finetune --method lora` writes) beside the model,
        unmerged, as `name`: `generate(..., adapter=name)` then runs with it, while other calls run without."""
        lora.load(self.engine, name, path)

    def unload_adapter(self, name: str) -> None:
        lora.unload(self.engine, name)

    @property
    def adapters(self) -> list[str]:
        """The names of the LoRA adapters loaded."""
        return lora.names(self.model)


def _batch(prompts: str | list[str] | list[list[int]] | list[int]) -> list[str | list[int]]:
    """One prompt (a string or token ids) as a list of one; a list of prompts as it is."""
    one = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
    return cast(list[str | list[int]], [prompts] if one else list(prompts))
