"""Tool (function) calling in the model's own format: which format a chat template speaks, the grammar that makes a
call well-formed, and the parser that reads calls back out of the model's text, whole or as it streams.

The tools reach the model through its chat template (transformers' `tools=` convention); the template also says
how the model writes a call, and three formats cover the families LLMasOS runs:

- `llama3_json` (Llama 3.1/3.2/3.3): the turn is one JSON object, `{"name": ..., "parameters": {...}}`;
- `hermes` (Qwen2.5, Qwen3, Hermes 2/3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks,
  after any text;
- `mistral`: `[TOOL_CALLS]` and a JSON list of `{"name": ..., "arguments": {...}}`.

Calls are read from the generated text with special tokens kept (`[TOOL_CALLS]` is one) and stop tokens dropped.
A call's `arguments` is the JSON text of the arguments object exactly as the model wrote it, in the whole answer
and in the streamed fragments alike. A turn whose calls cannot be read (auto mode: the model was free) is plain
content; `ToolCallParser` is the one reader for both, fed the whole text or its pieces.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmasos.errors import InvalidRequestError
from llmasos.inference.structured import JSON_OPTIONS, StructuredOutputError, StructuredOutputs

if TYPE_CHECKING:
    from llmasos.tokenization import Tokenizer

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass
class ToolCall:
    """One call the model made: `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolFormat:
    """How one family of chat templates writes tool calls."""

    name: str
    args_key: str  # "parameters" (Llama 3) or "arguments"
    start: str = ""  # the marker that opens the calls ("" for Llama 3: the turn starts with the JSON)
    open: tuple[str, ...] = ()  # what comes before each call (markers, text)
    close: tuple[str, ...] = ()  # what comes after each call
    between: str = ""  # what separates two calls
    array: bool = False  # the calls are one JSON list (Mistral)
    single: bool = False  # the template renders one call per turn only (Llama 3)
    id_length: int = 0  # Mistral's templates want 9 alphanumeric characters; 0: OpenAI's "call_" + 24

    def new_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(ALPHANUMERIC) for _ in range(self.id_length))
        return "call_" + "".join(secrets.choice(ALPHANUMERIC) for _ in range(24))

    @property
    def markers(self) -> list[str]:
        return [m for m in (self.start, *self.open, *self.close) if m.strip()]

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, token_id: Callable[[str], int | None]) -> str:
        """A Lark grammar (llguidance's dialect) of a turn that calls one of `tools` (several if `parallel`), with
        the arguments their JSON Schema allows, written as the model's format writes calls. A marker that is one
        token of the vocabulary (`token_id`) is that token."""

        def literal(text: str) -> str:
            i = token_id(text) if text in self.markers else None
            return f"<[{i}]>" if i is not None else json.dumps(text)

        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, self.args_key: parameters(t)},
                "required": ["name", self.args_key],
                "additionalProperties": False,
            }
            for t in tools
        ]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        call = {**call, "x-guidance": JSON_OPTIONS}
        many = parallel and not self.single
        if self.array:
            listed = {
                "type": "array",
                "items": call,
                "minItems": 1,
                **({} if many else {"maxItems": 1}),
                "x-guidance": JSON_OPTIONS,
            }
            return f'start: {literal(self.start)} " "? calls\ncalls: %json {json.dumps(listed)}\n'  # "[TOOL_CALLS] [..."
        one = " ".join([*map(literal, self.open), "call", *map(literal, self.close)])
        rest = f" ({literal(self.between)} {one})*" if many else ""
        return f"start: {one}{rest}\ncall: %json {json.dumps(call)}\n"


FORMATS = {
    "llama3_json": ToolFormat("llama3_json", "parameters", between="; ", single=True),
    "hermes": ToolFormat(
        "hermes", "arguments", start="<tool_call>", open=("<tool_call>", "\n"), close=("\n", "</tool_call>"), between="\n"
    ),
    "mistral": ToolFormat("mistral", "arguments", start="[TOOL_CALLS]", between=", ", array=True, id_length=9),
}


def tool_format(template: str) -> ToolFormat | None:
    """The tool-call format a chat template speaks, or None when it takes no tools or writes calls another way."""
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if '"parameters": ' in template or "<|python_tag|>" in template:
        return FORMATS["llama3_json"]
    return None


def parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


def check_tools(tools: Any, param: str = "tools") -> list[dict[str, Any]]:
    """OpenAI's tool list, checked: each `{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}`, names unique and well-formed, parameters a JSON Schema we can enforce. Raises InvalidRequestError
    naming the field."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError(f"{param} must be a non-empty list of tools", param=param)
    seen = set()
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequestError(f'{where}.type must be "function"', param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function must be an object with a name", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidRequestError(
                f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes, got {name!r}",
                param=f"{where}.function.name",
            )
        if name in seen:
            raise InvalidRequestError(f"{where}.function.name: {name!r} is given twice", param=f"{where}.function.name")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise InvalidRequestError(f"{where}.function.description must be a string", param=f"{where}.function.description")
        schema = fn.get("parameters")
        if schema is not None:
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                raise InvalidRequestError(
                    f"{where}.function.parameters must be a JSON Schema of an object", param=f"{where}.function.parameters"
                )
            try:
                StructuredOutputs(json=schema)
            except StructuredOutputError as e:
                raise InvalidRequestError(
                    f"{where}.function.parameters: {e.detail}", param=f"{where}.function.parameters"
                ) from None
    return tools


def pick_tools(tools: list[dict[str, Any]], choice: Any, param: str = "tool_choice") -> tuple[str, list[dict[str, Any]]]:
    """OpenAI's tool_choice -> ("none" | "auto" | "required", the tools a call may use). A named function is
    "required" with that one tool."""
    if choice in (None, "auto", "none", "required"):
        return choice or "auto", tools
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
    if name is None:
        raise InvalidRequestError(
            f'{param} must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}', param=param
        )
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        known = ", ".join(t["function"]["name"] for t in tools)
        raise InvalidRequestError(f"{param} names the function {name!r}, which is not in tools ({known})", param=param)
    return "required", named


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped messages as chat templates read them (transformers' convention): a tool call's `arguments`
    as an object rather than JSON text. Raises InvalidRequestError for arguments that are not a JSON object."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls:
            m = copy.copy(m)
            converted = []
            for j, call in enumerate(calls):
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError as e:
                        where = f"messages[{i}].tool_calls[{j}].function.arguments"
                        raise InvalidRequestError(f"{where} is not valid JSON ({e.msg})", param=where) from None
                fn["arguments"] = args
                converted.append({**call, "function": fn})
            m["tool_calls"] = converted
        out.append(m)
    return out


# ---- reading calls back ----------------------------------------------------------------------------


def _skip_string(text: str, i: int) -> int | None:
    """The index after the JSON string that starts at text[i] (a quote), or None when it is not closed yet."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i + 1
        else:
            i += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """The index after the JSON object or list that starts at text[i], or None when it is not closed yet."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _skip_string(text, i)
            if end is None:
                return None
            i = end
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _arguments_span(text: str, key: str) -> tuple[int, int]:
    """Where, in the text of a JSON object (valid, holding `key`), the value of its top-level `key` is."""
    decoder = json.JSONDecoder()
    i = 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        name, i = decoder.raw_decode(text, i)
        while text[i] in " \t\r\n:":
            i += 1
        _, end = decoder.raw_decode(text, i)
        if name == key:
            return i, end
        i = end


@dataclass
class ToolEvent:
    """What the parser read: content text, the start of a call (index, id, name), or a piece of its arguments."""

    kind: str  # "content" | "call" | "arguments"
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


@dataclass
class ToolCallParser:
    """Reads a turn's text (special tokens kept, stop tokens dropped) into content and tool calls, whole (`feed` it
    all, then `finish`) or as it streams.

    live: the turn was constrained to well-formed calls (tool_choice required or named), so a call's name is
    sent as soon as it is written and its arguments as they come. Otherwise a call is sent when it is complete
    and has been read as a call to one of the tools; text where a call should be that is not one is content
    (all of the turn when no call was read before it). parallel=False keeps the first call only."""

    format: ToolFormat
    names: set[str]
    parallel: bool = True
    live: bool = False
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    _buffer: str = ""  # text not yet sent
    _skipped: str = ""  # markers and separators passed over since the last call (content again if no call follows)
    _mode: str = "start"  # start | content | calls | text (content to the end) | done
    _sent: int = 0  # characters of the current call's arguments already sent (live)
    _header: bool = False  # the current call's start has been sent (live)

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        return self._advance(final=False)

    def finish(self) -> list[ToolEvent]:
        """The last events, once the turn has ended."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while True:
            before = (self._mode, len(self._buffer))
            if self._mode == "start":
                self._start(final)
            if self._mode in ("content", "text"):
                events += self._content(final)
            if self._mode == "calls":
                events += self._calls(final)
            if self._mode == "done":
                self._buffer = ""
                return events
            if (self._mode, len(self._buffer)) == before:
                return events

    def _start(self, final: bool) -> None:
        if self.format.start:  # hermes, mistral: content until the marker
            self._mode = "content"
            return
        text = self._buffer.lstrip()  # llama3_json: the turn is calls if it starts with an object
        if text.startswith("<|python_tag|>"):
            text = text[len("<|python_tag|>") :].lstrip()
        if not final and (not text or "<|python_tag|>".startswith(text)):
            return  # nothing yet, or the start of the tag
        if text.startswith("{"):
            self._skipped, self._buffer, self._mode = self._buffer[: len(self._buffer) - len(text)], text, "calls"
        else:
            self._mode = "text"

    def _content(self, final: bool) -> list[ToolEvent]:
        marker = self.format.start
        if self._mode == "content":
            at = self._buffer.find(marker)
            if at >= 0:
                text, self._buffer, self._mode = self._buffer[:at], self._buffer[at:], "calls"
                return self._say(text)
            if not final:  # hold back what could be the start of the marker
                keep = _partial_suffix(self._buffer, [marker])
                text, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
                return self._say(text)
        text, self._buffer = self._buffer, ""
        return self._say(text)

    def _say(self, text: str) -> list[ToolEvent]:
        if not text:
            return []
        self.content += text
        return [ToolEvent("content", text)]

    def _separators(self) -> list[str]:
        f = self.format
        pieces = [*f.markers, f.between, ";", ","] + (["[", "]"] if f.array else [])
        return [p.strip() for p in pieces if p.strip()]

    def _skip_separators(self) -> None:
        """Pass over what may stand between calls: markers, separators, whitespace."""
        pieces = self._separators()
        while True:
            text = self._buffer.lstrip()
            piece = next((p for p in pieces if text.startswith(p)), "")
            text = text[len(piece) :]
            self._skipped += self._buffer[: len(self._buffer) - len(text)]
            self._buffer = text
            if not piece:
                return

    def _calls(self, final: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while True:
            self._skip_separators()
            if not self._buffer:
                if final:
                    self._mode = "done"
                return events
            if not self._buffer.startswith("{"):
                if not final and any(p.startswith(self._buffer) for p in self._separators()):
                    return events  # the start of a marker: wait for the rest
                return events + self._unreadable()
            end = _value_end(self._buffer, 0)
            if end is None:
                if self.live:
                    events += self._live()
                if final:  # the turn ended inside a call
                    return events + self._unreadable()
                return events
            call = self._read(self._buffer[:end])
            if call is None:
                return events + self._unreadable()
            if self.calls and not self._header and not self.parallel:  # one call was asked for: drop the others
                self._mode = "done"
                return events
            name, args = call
            if not self._header:
                self.calls.append(ToolCall(self.format.new_id(), name, ""))
                events.append(ToolEvent("call", index=len(self.calls) - 1, id=self.calls[-1].id, name=name))
            self.calls[-1].arguments = args
            if args[self._sent :]:
                events.append(ToolEvent("arguments", args[self._sent :], index=len(self.calls) - 1))
            self._buffer, self._skipped, self._sent, self._header = self._buffer[end:], "", 0, False

    def _read(self, text: str) -> tuple[str, str] | None:
        """(name, arguments as written) of a complete call object, or None if it is not a call to one of the tools."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None
        key = next((k for k in ("parameters", "arguments") if k in obj), None) if isinstance(obj, dict) else None
        if key is None or obj.get("name") not in self.names:
            return None
        args = obj[key]
        if isinstance(args, str):  # some models write the arguments as JSON text
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError:
                return None
            return (obj["name"], args) if isinstance(parsed, dict) else None
        if not isinstance(args, dict):
            return None
        start, end = _arguments_span(text, key)
        return obj["name"], text[start:end]

    def _live(self) -> list[ToolEvent]:
        """A call being written under the grammar: its start once the name is complete, then its arguments."""
        head = re.match(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:parameters|arguments)"\s*:\s*', self._buffer)
        if head is None:
            return []
        events = []
        if not self._header:
            name = json.loads(head.group(1))
            self.calls.append(ToolCall(self.format.new_id(), name, ""))
            self._header = True
            events.append(ToolEvent("call", index=len(self.calls) - 1, id=self.calls[-1].id, name=name))
        start = head.end()
        stop = _value_end(self._buffer, start) if self._buffer[start : start + 1] == "{" else None
        args = self._buffer[start : stop or len(self._buffer)]
        if len(args) > self._sent:
            events.append(ToolEvent("arguments", args[self._sent :], index=len(self.calls) - 1))
            self.calls[-1].arguments, self._sent = args, len(args)
        return events

    def _unreadable(self) -> list[ToolEvent]:
        """Text where a call should be that is not one is content, with the markers before it; a live call that
        broke off (the turn ran out of tokens) stays as it was sent."""
        if self._header:
            self._mode = "done"
            return []
        self._buffer, self._skipped, self._mode = self._skipped + self._buffer, "", "text"
        return []


def _partial_suffix(text: str, markers: list[str]) -> int:
    """The length of the longest end of `text` that is the start of one of `markers` (and not all of it)."""
    for k in range(min(max(map(len, markers)) - 1, len(text)), 0, -1):
        if any(m.startswith(text[-k:]) for m in markers):
            return k
    return 0


@dataclass
class ToolPlan:
    """What one chat request asks of tools: the tools its prompt shows, the format the model writes calls in,
    which tools a call may use, and (tool_choice required or a named function) the grammar that makes it call."""

    format: ToolFormat
    tools: list[dict[str, Any]]
    allowed: list[dict[str, Any]]
    choice: str  # "auto" | "required"
    parallel: bool
    structured: StructuredOutputs | None

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.allowed}

    def reader(self, tokenizer: Tokenizer) -> ToolCallReader:
        return ToolCallReader(self, tokenizer)

    def read(self, completion, tokenizer: Tokenizer) -> None:
        """Read a finished sample's calls into it: `tool_calls`, `text` (what it said besides) and finish_reason
        "tool_calls" (unless it ran out of tokens)."""
        reader = self.reader(tokenizer)
        reader.feed(completion.token_ids, finished=True)
        if reader.calls:
            completion.tool_calls, completion.text = reader.calls, reader.content
            if completion.finish_reason != "length":
                completion.finish_reason = "tool_calls"


def plan_tools(tokenizer: Tokenizer, tools: Any, tool_choice: Any = None, parallel: bool = True) -> ToolPlan | None:
    """Check a request's tools and tool_choice (OpenAI's) against the model's chat template. None when the turn
    calls no tool (no tools, or tool_choice "none": the prompt then shows none either). Raises
    InvalidRequestError naming the field: a malformed tool, a tool_choice naming no tool, a template that takes
    no tools."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools: give the tools it may call", param="tool_choice")
        return None
    check_tools(tools)
    choice, allowed = pick_tools(tools, tool_choice)
    if choice == "none":
        return None
    template = tokenizer.chat_template
    fmt = tool_format(template)
    if fmt is None:
        what = "takes no tools" if "tools" not in template else "writes tool calls in a format LLMasOS does not read"
        raise InvalidRequestError(
            f"this model's chat template {what} (LLMasOS reads Llama 3.1 JSON, Hermes/Qwen <tool_call> and Mistral "
            "[TOOL_CALLS] calls)",
            param="tools",
        )
    structured = None
    if choice == "required":
        structured = StructuredOutputs(grammar=fmt.grammar(allowed, parallel, tokenizer.token_to_id))
    return ToolPlan(fmt, tools, allowed, choice, parallel, structured)


class ToolCallReader:
    """One sample's tool calls, read from its token ids as they come (stop tokens dropped, special tokens other
    than the format's markers dropped, the rest decoded as the model wrote it)."""

    def __init__(self, plan: ToolPlan, tokenizer: Tokenizer):
        from llmasos.tokenization import StreamDecoder

        special = tokenizer.special_ids
        kept = {tokenizer.token_to_id(m) for m in [*plan.format.markers, "<|python_tag|>"]} & special
        self.dropped = (special - kept) | tokenizer.stop_ids
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=False)
        self.parser = ToolCallParser(plan.format, plan.names, plan.parallel, live=plan.choice == "required")

    def feed(self, token_ids: list[int], finished: bool = False) -> list[ToolEvent]:
        text = "".join(self.decoder.push(t) for t in token_ids if t not in self.dropped)
        if finished:
            text += self.decoder.flush()
        events = self.parser.feed(text)
        return events + self.parser.finish() if finished else events

    @property
    def calls(self) -> list[ToolCall]:
        return self.parser.calls

    @property
    def content(self) -> str:
        return self.parser.content


def parse_tool_calls(fmt: ToolFormat, text: str, names: set[str], parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole turn; no calls when the turn holds none that can be read."""
    parser = ToolCallParser(fmt, names, parallel)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
