"""Tool calling over HTTP with the official `openai` client, on tiny models whose chat templates take tools in the
Llama 3.1 (JSON call) and Hermes (<tool_call> tags) styles: required and named calls are well-formed and valid,
streamed as OpenAI streams them; auto mode reads a call the model writes and leaves text that is not one as
content; history with calls and results renders; a malformed tool is a 400 naming the field."""

import json
from contextlib import contextmanager

import jsonschema
import pytest
from helpers import API_KEY, WEATHER_TOOL, live_server, make_tool_model

from llmasos import LLM

TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
SCHEMAS = {"get_weather": WEATHER_TOOL["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["llama3.1", "hermes"])
def tool_server(request, tmp_path_factory):
    path = make_tool_model(tmp_path_factory.mktemp(request.param) / "tiny", request.param)
    llm = LLM.load(path, max_batch_size=16)
    with live_server(llm, served_model_name="tiny", api_key=API_KEY) as url:
        yield url, llm


@pytest.fixture
def tclient(tool_server):
    import openai

    return openai.OpenAI(base_url=f"{tool_server[0]}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def thttp(tool_server):
    import httpx

    with httpx.Client(base_url=tool_server[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@contextmanager
def scripted(llm, text):
    """The engine's sampler replaced by one that writes `text` (then the end of the turn), whatever the model says:
    to see what the server makes of a call a real model would write."""
    tokenizer, engine = llm.tokenizer, llm.engine
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_id]
    engine._pick = lambda logits, seqs: [(ids[min(len(s.completion.token_ids), len(ids) - 1)], None) for s in seqs]
    try:
        yield
    finally:
        del engine._pick


def streamed_calls(chunks):
    """The calls a stream carried, put together as a client does, and the stream's finish reasons."""
    calls, finishes = {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                if d.id is not None:  # a call starts: index, id, type and name first
                    assert d.index not in calls and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    calls[d.index]["arguments"] += d.function.arguments
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return list(calls.values()), finishes


def test_required_calls_are_valid_and_stream_as_openai_streams_them(tclient):
    kw = dict(model="tiny", messages=USER, tools=[WEATHER_TOOL, TIME], tool_choice="required", max_tokens=300, temperature=1)
    for seed in range(4):
        out = tclient.chat.completions.create(**kw, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        chunks = list(tclient.chat.completions.create(**kw, seed=seed, stream=True))
        calls, finishes = streamed_calls(chunks)
        assert finishes == ["tool_calls"]
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls
        ]
        assert sum(1 for c in chunks for ch in c.choices for d in ch.delta.tool_calls or [] if d.id is None) > len(
            calls
        )  # in pieces


def test_a_named_function_without_parallel_calls(tclient):
    out = tclient.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=[WEATHER_TOOL, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=300,
        seed=3,
    )
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


def call_text(llm, name, arguments):
    if "<tool_call>" in llm.tokenizer.chat_template:
        return f'I will check.\n<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'
    return f'{{"name": "{name}", "parameters": {arguments}}}'


def test_auto_mode_reads_the_call_the_model_writes(tclient, tool_server):
    llm = tool_server[1]
    kw = dict(model="tiny", messages=USER, tools=[WEATHER_TOOL], max_tokens=200)
    with scripted(llm, call_text(llm, "get_weather", '{"city": "Paris", "unit": "c"}')):
        whole = tclient.chat.completions.create(**kw)
        chunks = list(tclient.chat.completions.create(**kw, stream=True))
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris", "unit": "c"}')
    calls, finishes = streamed_calls(chunks)
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)] and finishes == [
        "tool_calls"
    ]
    content = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert content == (choice.message.content or "")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Par',
        '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',
        "Sunny.",
    ],
)
def test_auto_mode_text_that_is_no_call_is_content(tclient, tool_server, text):
    kw = dict(model="tiny", messages=USER, tools=[WEATHER_TOOL], max_tokens=200)
    with scripted(tool_server[1], text):
        whole = tclient.chat.completions.create(**kw)
        chunks = list(tclient.chat.completions.create(**kw, stream=True))
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls and choice.message.content == text
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == text
    assert streamed_calls(chunks) == ([], ["stop"])


def test_tool_choice_none_and_a_conversation_with_results(tclient, thttp, tool_server):
    out = tclient.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8, seed=1
    )
    assert not out.choices[0].message.tool_calls
    history = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]
    out = tclient.chat.completions.create(model="tiny", messages=history, tools=[WEATHER_TOOL], max_tokens=8, seed=1)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = tool_server[1].chat_prompt(history, [WEATHER_TOOL])
    assert out.usage.prompt_tokens == len(prompt)
    text = tool_server[1].tokenizer.decode(prompt, skip_special_tokens=False)
    assert '{"city": "Paris", "unit": "c"}' in text and "21 degrees and sunny" in text


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "uniqueItems": True}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        (
            {
                "messages": USER
                + [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                    }
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_a_malformed_tool_is_a_400_naming_the_field(thttp, tool_server, fields, param):
    r = thttp.post("/v1/chat/completions", json={"messages": USER, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not tool_server[1].engine.has_work()


def test_a_template_that_takes_no_tools_says_so(http):
    r = http.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "takes no tools" in r.json()["error"]["message"]
