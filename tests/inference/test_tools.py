"""Tool calls: read back from each format, whole and streamed alike; the grammar of tool_choice required makes a
random-weight model call well-formed, schema-valid tools; `LLM.chat(messages, tools=...)`."""

import json

import jsonschema
import pytest
from helpers import WEATHER_TOOL, make_tool_model

from llmasos import LLM, SamplingParams
from llmasos.errors import InvalidRequestError
from llmasos.inference.tools import FORMATS, ToolCallParser, parse_tool_calls

NAMES = {"get_weather", "add"}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
CASES = [
    # (format, the model's text, content, [(name, arguments)])
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        "",
        [("get_weather", '{"city": "Paris", "unit": "c"}')],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": {"c": "}"}}}',
        "",
        [("add", '{"a": 1, "b": {"c": "}"}}')],
    ),
    (
        "llama3_json",
        '{"name": "add", "arguments": {"a": 1}}; {"name": "add", "arguments": {"a": 2}}',
        "",
        [("add", '{"a": 1}'), ("add", '{"a": 2}')],
    ),
    ("llama3_json", "It is sunny {honestly}.", "It is sunny {honestly}.", []),
    ("llama3_json", '{"name": "unknown_tool", "parameters": {}}', '{"name": "unknown_tool", "parameters": {}}', []),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
        "Let me look.\n",
        [("get_weather", '{"city": "Oslo", "unit": "f"}'), ("add", '{"a": 2, "b": 3}')],
    ),
    ("hermes", "a < b, and <tool_call> is a tag", "a < b, and <tool_call> is a tag", []),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>', "", [("add", '{"a": 1}')]),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {}}]',
        "",
        [("add", '{"a": 1, "b": 2}'), ("get_weather", "{}")],
    ),
    ("mistral", "Just text [with brackets].", "Just text [with brackets].", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_calls_are_read_whole_and_streamed_alike(fmt, text, content, calls):
    whole = parse_tool_calls(FORMATS[fmt], text, NAMES)
    assert whole[0] == content and [(c.name, c.arguments) for c in whole[1]] == calls
    for size in (1, 3, 7):  # streamed in pieces of every size: the same content and calls
        parser = ToolCallParser(FORMATS[fmt], NAMES)
        events = [e for i in range(0, len(text), size) for e in parser.feed(text[i : i + size])] + parser.finish()
        assert "".join(e.text for e in events if e.kind == "content") == content
        streamed = {}
        for e in events:
            if e.kind == "call":
                streamed[e.index] = [e.name, ""]
            elif e.kind == "arguments":
                streamed[e.index][1] += e.text
        assert [tuple(c) for c in streamed.values()] == calls


def test_one_call_only_when_parallel_calls_are_off():
    call = '<tool_call>\n{"name": "add", "arguments": {"a": %d}}\n</tool_call>'
    text = call % 1 + "\n" + call % 2
    assert [c.arguments for c in parse_tool_calls(FORMATS["hermes"], text, NAMES, parallel=False)[1]] == ['{"a": 1}']


def test_live_calls_send_the_name_first_then_argument_pieces():
    parser = ToolCallParser(FORMATS["llama3_json"], NAMES, live=True)
    events = []
    for piece in ['{"name": "a', 'dd", "parameters": {"a', '": 1', "2}", "}"]:
        events += parser.feed(piece)
    events += parser.finish()
    assert [(e.kind, e.name or e.text) for e in events] == [
        ("call", "add"),
        ("arguments", '{"a'),
        ("arguments", '": 1'),
        ("arguments", "2}"),
    ]
    assert parser.calls[0].arguments == '{"a": 12}' and parser.calls[0].id.startswith("call_")
    assert len(FORMATS["mistral"].new_id()) == 9 and FORMATS["mistral"].new_id().isalnum()


@pytest.fixture(scope="module", params=["llama3.1", "hermes", "mistral"])
def tool_llm(request, tmp_path_factory):
    path = make_tool_model(tmp_path_factory.mktemp(request.param) / "tiny", request.param)
    return LLM.load(path, max_batch_size=16)


USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_tool_choice_always_makes_a_valid_call(tool_llm):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, ADD)}
    for seed in range(12):
        out = tool_llm.chat(USER, SamplingParams(max_tokens=200, seed=seed), tools=[WEATHER_TOOL, ADD], tool_choice="required")
        c = out.outputs[0]
        assert c.finish_reason == "tool_calls" and c.tool_calls, c.text
        for call in c.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_a_named_function_is_the_one_called(tool_llm):
    choice = {"type": "function", "function": {"name": "add"}}
    out = tool_llm.chat(
        USER, SamplingParams(max_tokens=200, seed=1), tools=[WEATHER_TOOL, ADD], tool_choice=choice, parallel_tool_calls=False
    )
    assert [c.name for c in out.outputs[0].tool_calls] == ["add"]


def test_auto_mode_garbage_is_plain_content(tool_llm):
    out = tool_llm.chat(USER, SamplingParams(max_tokens=20, seed=1), tools=[WEATHER_TOOL])
    c = out.outputs[0]
    assert c.tool_calls is None and c.finish_reason in ("stop", "length")


def test_a_conversation_with_calls_and_results_renders(tool_llm):
    history = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "abcDEF123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "21 degrees"},
    ]
    text = tool_llm.tokenizer.decode(tool_llm.chat_prompt(history, [WEATHER_TOOL]), skip_special_tokens=False)
    assert '"name": "get_weather"' in text and '{"city": "Paris", "unit": "c"}' in text and "21 degrees" in text


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "retrieval", "function": {"name": "x"}}], None, "tools[0].type"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        ([WEATHER_TOOL, WEATHER_TOOL], None, "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
            None,
            "tools[0].function.parameters",
        ),
        ([WEATHER_TOOL], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER_TOOL], "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_a_malformed_tool_or_choice_is_refused_by_name(tool_llm, tools, choice, param):
    with pytest.raises(InvalidRequestError) as info:
        tool_llm.chat(USER, SamplingParams(max_tokens=5), tools=tools, tool_choice=choice)
    assert info.value.param == param
    assert not tool_llm.engine.has_work()
