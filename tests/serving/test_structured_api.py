"""Structured outputs over HTTP with the official `openai` client: response_format (json_object, json_schema, the
SDK's own `parse` with a pydantic model), vLLM's guided_* and structured_outputs fields, streamed and not, on the
random-weight tiny model; and a schema that cannot be enforced is a 400 naming the field, before any work."""

import json
import threading

import jsonschema
import pytest
from pydantic import BaseModel, Field

MSG = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def json_schema(schema, name="person"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schema_response_format(client):
    out = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=300, seed=1, n=4, response_format=json_schema(PERSON)
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_the_sdks_parse_with_a_pydantic_model(client):
    class City(BaseModel):
        name: str = Field(max_length=10)
        population: int = Field(ge=0)
        coastal: bool

    out = client.chat.completions.parse(model="tiny", messages=MSG, max_tokens=300, seed=2, response_format=City)
    assert isinstance(out.choices[0].message.parsed, City)


def test_json_object_streamed_equals_whole(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=300, seed=3, response_format=json_schema(PERSON))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    out = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=500, seed=4, response_format={"type": "json_object"}
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    assert out.choices[0].message.content.startswith("{")


def test_vllm_fields_on_chat_and_completions(client):
    choice = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=20, seed=5, extra_body={"guided_choice": ["yes", "no", "maybe"]}
    )
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    regex = client.completions.create(
        model="tiny", prompt="Phone:", max_tokens=30, seed=6, extra_body={"guided_regex": r"\d{3}-\d{4}"}
    )
    assert regex.choices[0].text[3] == "-" and regex.choices[0].text.replace("-", "").isdigit()
    guided = client.completions.create(model="tiny", prompt="JSON:", max_tokens=300, seed=7, extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(guided.choices[0].text), PERSON)
    newer = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=300, seed=8, extra_body={"structured_outputs": {"json": PERSON}}
    )
    jsonschema.validate(json.loads(newer.choices[0].message.content), PERSON)


@pytest.mark.parametrize(
    "fields, param, words",
    [
        (
            {"response_format": json_schema({"type": "array", "uniqueItems": True})},
            "response_format.json_schema.schema",
            ["uniqueItems"],
        ),
        (
            {"response_format": json_schema({"type": "object", "properties": {"a": {"if": {}, "then": {}}}})},
            "response_format.json_schema.schema",
            ["if", "then", "properties.a"],
        ),
        (
            {"response_format": json_schema({"type": "object", "required": "a"})},
            "response_format.json_schema.schema",
            ["required"],
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["required"]),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema", []),
        ({"response_format": json_schema(PERSON, name="a b")}, "response_format.json_schema.name", []),
        ({"response_format": {"type": "yaml"}}, "response_format.type", ["yaml"]),
        ({"guided_regex": "(unclosed"}, "guided_regex", ["unclosed"]),
        ({"guided_json": {"type": "object", "dependentRequired": {}}}, "guided_json", ["dependentRequired"]),
        ({"guided_choice": []}, "guided_choice", []),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", ["guided_regex and guided_choice"]),
        ({"structured_outputs": {"jsonn": {}}}, "structured_outputs.jsonn", []),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar", ["nowhere"]),
    ],
)
def test_a_bad_constraint_is_a_400_naming_the_field(http, llm, fields, param, words):
    r = http.post("/v1/chat/completions", json={"messages": MSG, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) and all(w in error["message"] for w in words), error["message"]
    assert not llm.engine.has_work()


def test_a_grammar_is_compiled_off_the_engine_thread_and_answers_the_same(client, llm, tiny_dir, monkeypatch):
    """The compile runs on a worker thread before the request is queued; the engine's thread (where `matchers`
    runs, at enqueue) only copies the compiled grammar, and the answer is what the Python API gives."""
    from llmasos import LLM, SamplingParams
    from llmasos.inference import structured

    schema = {  # compiled by no other test
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    compiled_on, copied_on = [], []
    compile_grammar, matchers = structured.compile_grammar, llm.engine.grammars.matchers
    monkeypatch.setattr(
        structured, "compile_grammar", lambda ll, g: (compiled_on.append(threading.current_thread()), compile_grammar(ll, g))[1]
    )
    monkeypatch.setattr(
        llm.engine.grammars, "matchers", lambda s, n: (copied_on.append(threading.current_thread()), matchers(s, n))[1]
    )
    out = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=60, temperature=0, response_format=json_schema(schema, name="city")
    )
    assert len(compiled_on) == 1 and len(copied_on) == 1  # compiled once, then copied at enqueue
    engine_thread = copied_on[0]
    assert engine_thread is not threading.main_thread() and compiled_on[0] is not engine_thread
    monkeypatch.undo()
    expected = LLM.load(tiny_dir).chat(MSG, SamplingParams(max_tokens=60, temperature=0, structured={"json": schema}))
    assert out.choices[0].message.content == expected.outputs[0].text
    jsonschema.validate(json.loads(expected.outputs[0].text), schema)
