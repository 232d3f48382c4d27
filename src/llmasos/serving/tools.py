"""Tool calling over HTTP: a chat request's messages and tools as the chat template reads them, and the model's
calls back in OpenAI's shapes, whole (`message.tool_calls`) or streamed (`delta.tool_calls`: a call's index, id and
name first, then pieces of its arguments). What the formats are and how calls are read: `inference/tools.py`.
"""

from __future__ import annotations

from typing import Any

from llmasos.errors import InvalidRequestError
from llmasos.inference.engine import Completion
from llmasos.inference.tools import ToolCall, ToolEvent, ToolPlan
from llmasos.serving import schemas as s
from llmasos.tokenization import Tokenizer

ROLES = ("system", "user", "assistant", "developer", "tool")  # "developer" is OpenAI's newer name for "system"


def template_turns(messages: list[s.ChatMessage]) -> list[dict[str, Any]]:
    """The messages as OpenAI-shaped dicts for the chat template; keys a message does not have are left out (templates
    test `'tool_calls' in message`). Raises InvalidRequestError for an unknown role."""
    turns = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role is {m.role!r}; use one of {', '.join(ROLES)}", param=f"messages[{i}].role"
            )
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            turn["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
        if m.role == "tool":
            if m.tool_call_id is not None:
                turn["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                turn["name"] = m.name
        turns.append(turn)
    return turns


def characters(turns: list[dict[str, Any]]) -> int:
    """The text a conversation holds (for the length check before rendering)."""
    return sum(len(t["content"]) + sum(len(str(c["function"]["arguments"])) for c in t.get("tool_calls", [])) for t in turns)


def _calls_out(calls: list[ToolCall]) -> list[s.ToolCallOut]:
    return [s.ToolCallOut(id=c.id, function=s.FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]


def message(plan: ToolPlan | None, completion: Completion, tokenizer: Tokenizer) -> s.AssistantMessage:
    """A finished sample as the assistant's message: its calls read into `tool_calls` (its finish_reason becomes
    "tool_calls"), what it said besides as content."""
    if plan is None:
        return s.AssistantMessage(content=completion.text)
    plan.read(completion, tokenizer)
    if not completion.tool_calls:
        return s.AssistantMessage(content=completion.text)
    return s.AssistantMessage(content=completion.text or None, tool_calls=_calls_out(completion.tool_calls))


class StreamedCalls:
    """One streamed sample's tool calls: each step's tokens in, the deltas to send out."""

    def __init__(self, plan: ToolPlan, tokenizer: Tokenizer):
        self.reader = plan.reader(tokenizer)

    def deltas(self, token_ids: list[int], finished: bool) -> list[s.ChatDelta]:
        return [_delta(e) for e in self.reader.feed(token_ids, finished)]

    def finish_reason(self, completion: Completion) -> str | None:
        return "tool_calls" if self.reader.calls and completion.finish_reason != "length" else completion.finish_reason


def _delta(event: ToolEvent) -> s.ChatDelta:
    if event.kind == "content":
        return s.ChatDelta(content=event.text)
    if event.kind == "call":
        call = s.ToolCallDelta(
            index=event.index, id=event.id, type="function", function=s.FunctionCallDelta(name=event.name, arguments="")
        )
    else:
        call = s.ToolCallDelta(index=event.index, function=s.FunctionCallDelta(arguments=event.text))
    return s.ChatDelta(tool_calls=[call])
