"""Log-likelihoods and sliding-window perplexity: batched forward passes over `llm.model`.

One function scores (context, continuation) token pairs for everything that needs it: multiple
choice, the perplexity of a generation task's references, and the lm-eval adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llmasos.data.prepare import PackedData
from llmasos.errors import LLMasOSError
from llmasos.progress import progress_bar


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split as lm-eval splits them: the whole text is
    encoded once (so the boundary tokenizes naturally) and trailing spaces of the context move to the
    continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return whole[: len(context_ids)], whole[len(context_ids) :]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding yields the continuation) per request.

    Requests run longest first in right-padded batches (a causal model never looks at the padding);
    a context longer than the window loses its oldest tokens, as in lm-eval's HF model."""
    max_length = max_length or model.config.max_position_embeddings
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    bar = None
    if progress:
        bar = progress_bar(total=len(requests), desc="scoring", unit="req", leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = []
        for i in batch:
            context, continuation = requests[i]
            if not continuation or len(continuation) > max_length:
                raise LLMasOSError(f"a continuation of {len(continuation)} tokens cannot be scored in a window of {max_length}")
            inputs.append((context + continuation)[-(max_length + 1) : -1])
        ids = torch.zeros(len(batch), max(map(len, inputs)), dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, : len(x)] = torch.tensor(x)
        logits = model(ids.to(_device(model)))
        for row, i in enumerate(batch):
            target = torch.tensor(requests[i][1], device=logits.device)
            end = len(inputs[row])
            logprobs = logits[row, end - len(target) : end].float().log_softmax(-1)
            total = logprobs.gather(-1, target[:, None]).sum()
            results[i] = (float(total), bool((logprobs.argmax(-1) == target).all()))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # the summed negative log-likelihood (nats)
    tokens: int  # tokens scored
    windows: int


@torch.inference_mode()
def sliding_perplexity(
    model, ids: list[int], max_length: int | None = None, stride: int | None = None, batch_size: int = 4, progress: bool = False
) -> Perplexity:
    """Perplexity of a token sequence by transformers' sliding-window recipe.

    Windows of max_length tokens start every `stride` tokens; each scores only the tokens no earlier
    window scored, with the rest of the window as context (the first token has no context and is not
    scored). stride defaults to half the window."""
    max_length = max_length or model.config.max_position_embeddings
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length:
        raise LLMasOSError(f"stride {stride} must be between 1 and the window length {max_length}")
    if len(ids) < 2:
        raise LLMasOSError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    windows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        windows.append((begin, end, max(prev_end, begin + 1)))  # score tokens [first, end)
        prev_end = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    bar = None
    if progress:
        bar = progress_bar(total=len(windows), desc="perplexity", unit="window", leave=False)
    device = _device(model)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (begin, end, _) in enumerate(batch):
            x[row, : end - begin] = torch.tensor(ids[begin:end])
        logits = model(x.to(device))
        for row, (begin, end, first) in enumerate(batch):
            logprobs = logits[row, first - begin - 1 : end - begin - 1].float().log_softmax(-1)
            target = x[row, first - begin : end - begin].to(logits.device)
            nll -= float(logprobs.gather(-1, target[:, None]).sum())
            count += end - first
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return Perplexity(math.exp(nll / count), nll, count, len(windows))


def perplexity_tokens(source: str | Path, tokenizer, vocab_size: int) -> list[int]:
    """The tokens to score: a text file (encoded with the model's tokenizer) or a prepared data dir's val split."""

    path = Path(source)
    if path.is_dir():
        data = PackedData(path, "val")
        if data.metadata.get("vocab_size", 0) > vocab_size:
            raise LLMasOSError(
                f"{path}: prepared with a vocabulary of {data.metadata['vocab_size']} tokens; the model has {vocab_size}"
            )
        if len(data) < 2:
            raise LLMasOSError(f"{path}: the val split has {len(data)} tokens (prepare with --val-fraction above 0)")
        return data.tokens(0, len(data)).tolist()
    if not path.is_file():
        raise LLMasOSError(f"{path}: no such text file or prepared data dir")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LLMasOSError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return tokenizer.encode(text)
