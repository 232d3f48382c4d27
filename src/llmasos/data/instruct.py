"""Instruction data for fine-tuning: Alpaca records and chat conversations, with loss masks.

Accepted records, one per JSONL line or as a JSON list:
- Alpaca: `{"instruction", "input"?, "output", "system"?}` → a user turn (instruction, then the input
  after a blank line) and the assistant's answer;
- chat: `{"messages": [{"role", "content"}, ...]}` as OpenAI's fine-tuning files have them;
- completion: `{"prompt", "completion"}`, used as raw text with no template.

Conversations are rendered through the model's chat template (its own, or the built-in format
`llmasos chat` uses), so training sees exactly the prompt format inference builds. Labels are the
token ids inside assistant turns and -100 elsewhere: only answers are trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmasos.data.sources import InputError
from llmasos.errors import LLMasOSError

IGNORE = -100  # the label of tokens that are not trained (torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not trained

    @property
    def trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def read_records(path: Path) -> Iterator[tuple[Any, str]]:
    """(record, "file:line") from a JSONL file, or from a JSON file holding one list of records."""
    if not path.is_file():
        raise LLMasOSError(f"{path}: no such file")
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise InputError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
        for i, record in enumerate(records):
            yield record, f"{path}:record {i + 1}"
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw), f"{path}:{number}"
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None


def check_messages(messages: Any, field: str) -> list[dict[str, str]]:
    """A record's non-empty list of chat messages, each a role and a string content; ValueError names what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{field!r} must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"{field}[{i}] must have a role ({', '.join(ROLES)}) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_messages(record: Any) -> list[dict[str, str]] | tuple[str, str]:
    """The conversation of a record, or (prompt, completion) for a completion record; ValueError names what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        messages = check_messages(record["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant message to train on")
        return messages
    if "instruction" in record and "output" in record:
        fields = {k: record.get(k, "") for k in ("instruction", "input", "output", "system")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"field {bad[0]!r} must be a string")
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"].strip() else "")
        system = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record["prompt"], record["completion"]
    raise ValueError(
        f"not an instruction record: expected 'messages', 'instruction' + 'output', or 'prompt' + "
        f"'completion' (fields: {', '.join(record) or 'none'})"
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_conversation(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Token ids of the whole conversation, with labels only on the assistant turns.

    Each assistant turn spans from the end of the prompt that asks for it (the conversation so far
    with the generation prompt) to the end of the conversation including it; boundaries are found
    on the token ids, so a merge across a boundary cannot shift a label."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        asked = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)
        answered = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False, tokenize=True)
        start, end = common_prefix(asked, ids), common_prefix(answered, ids)
        labels[start:end] = ids[start:end]
    _end_with_stop(tokenizer, ids, labels)
    return Example(ids, labels)


def tokenize_completion(tokenizer, prompt: str, completion: str) -> Example:
    """A raw prompt (with BOS as the tokenizer adds it) followed by the trained completion and EOS."""
    prompt_ids = tokenizer.encode(prompt)
    answer = tokenizer.encode(completion, add_special_tokens=False)
    ids = prompt_ids + answer
    labels = [IGNORE] * len(prompt_ids) + answer
    _end_with_stop(tokenizer, ids, labels)
    return Example(ids, labels)


def _end_with_stop(tokenizer, ids: list[int], labels: list[int]) -> None:
    """Make the last answer contain a stop token, so the model learns to end it: templates usually
    close a turn with one (`<|eot_id|>`, `</s>`); where not, EOS is trained right after the answer."""
    trained = [i for i, t in enumerate(labels) if t != IGNORE]
    if not trained or tokenizer.eos_id is None:
        return
    start = trained[-1]
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if any(t in tokenizer.stop_ids for t in labels[start : trained[-1] + 1]):
        return
    del ids[trained[-1] + 1 :], labels[trained[-1] + 1 :]
    ids.append(tokenizer.eos_id)
    labels.append(tokenizer.eos_id)


def load_examples(path: Path | str, tokenizer) -> list[Example]:
    """Tokenized, masked examples of an instruction file; the first malformed record stops it, named by file:line."""
    path = Path(path).expanduser()
    examples = []
    for record, where in read_records(path):
        try:
            conversation = to_messages(record)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None
        if isinstance(conversation, tuple):
            examples.append(tokenize_completion(tokenizer, *conversation))
        else:
            examples.append(tokenize_conversation(tokenizer, conversation))
    if not examples:
        raise LLMasOSError(f"{path}: no records")
    return examples
