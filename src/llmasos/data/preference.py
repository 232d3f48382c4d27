"""Preference data for DPO: (prompt, chosen, rejected) in TRL's formats, tokenized as TRL tokenizes them.

Accepted records, one per JSONL line or as a JSON list:
- standard: `{"prompt": "...", "chosen": "...", "rejected": "..."}`, raw text; EOS ends each completion;
- conversational: `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`, rendered through
  the model's chat template (the prompt with the generation prompt, as inference builds it);
- implicit prompt: `{"chosen": ..., "rejected": ...}` (both text, or both message lists) whose shared
  beginning is the prompt, as TRL's `extract_prompt` takes it (a `prompt` beside message lists that
  already hold it is ignored, as TRL does).

Each pair is tokenized as prompt + chosen and prompt + rejected; the completion starts where the
tokenized prompt stops being a prefix of both (a merge across the boundary cannot shift it). Only
completion tokens count in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos.data.instruct import check_messages, common_prefix, read_records
from llmasos.data.sources import InputError
from llmasos.errors import LLMasOSError


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    chosen: list[int]  # the completions' token ids, after the prompt's
    rejected: list[int]
    ref: tuple[float, float] | None = None  # precomputed reference log-probabilities of (chosen, rejected)


def _shared_prefix(chosen: Any, rejected: Any) -> int:
    """TRL's `extract_prompt`: the length of the longest shared beginning (messages, or characters before a space)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and 0 < n and chosen[n - 1] == " ":  # the space starts the completion
        n -= 1
    return n


def to_preference(record: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a record: three strings or three message lists; ValueError names what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(
            f"not a preference record: expected 'chosen' and 'rejected' (and 'prompt'), fields: {', '.join(record) or 'none'}"
        )
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen, rejected = check_messages(chosen, "chosen"), check_messages(rejected, "rejected")
        if isinstance(prompt, list):
            prompt = check_messages(prompt, "prompt")
        else:  # implicit: the shared turns are the prompt
            n = _shared_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise ValueError("'chosen' and 'rejected' share no prompt turns (give a 'prompt')")
        if not chosen or not rejected:
            raise ValueError("'chosen' and 'rejected' must each add turns after the prompt")
        return prompt, chosen, rejected
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise ValueError(f"{name!r} must be a string or a list of messages, found {type(value).__name__}")
    if prompt is None:
        n = _shared_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif not isinstance(prompt, str):
        raise ValueError(f"'prompt' must be a string like 'chosen' and 'rejected', found {type(prompt).__name__}")
    if not chosen or not rejected:
        raise ValueError("'chosen' and 'rejected' must be non-empty")
    return prompt, chosen, rejected


def tokenize_pair(tokenizer, prompt: Any, chosen: Any, rejected: Any) -> Pair:
    """Token ids of a pair, as TRL's DPOTrainer makes them: text gets BOS as the tokenizer adds it and EOS after each
    completion; conversations are rendered through the chat template."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        with_chosen = tokenizer.apply_chat_template(prompt + chosen, add_generation_prompt=False, tokenize=True)
        with_rejected = tokenizer.apply_chat_template(prompt + rejected, add_generation_prompt=False, tokenize=True)
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer.encode(prompt)
        with_chosen = tokenizer.encode(prompt + (chosen if chosen.endswith(eos) else chosen + eos))
        with_rejected = tokenizer.encode(prompt + (rejected if rejected.endswith(eos) else rejected + eos))
    start = min(common_prefix(prompt_ids, with_chosen), common_prefix(prompt_ids, with_rejected))
    return Pair(with_chosen[:start], with_chosen[start:], with_rejected[start:])


def load_pairs(path: Path | str, tokenizer) -> list[Pair]:
    """Tokenized preference pairs of a file; the first malformed record stops it, named by file:line."""
    path = Path(path).expanduser()
    pairs = []
    for record, where in read_records(path):
        try:
            pair = tokenize_pair(tokenizer, *to_preference(record))
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
        if not pair.chosen or not pair.rejected:
            raise InputError(f"{where}: a completion has no tokens of its own after the prompt")
        pairs.append(pair)
    if not pairs:
        raise LLMasOSError(f"{path}: no records")
    return pairs
