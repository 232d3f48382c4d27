"""Structured outputs: a random-weight model, which would otherwise write garbage, writes only what the constraint
allows (every sample parses and validates), constrained and free requests share a batch, and a constraint that
cannot be enforced is refused by name before any work."""

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from helpers import make_hf_model, write_bpe_tokenizer, write_sp_tokenizer

from llmasos import LLM, SamplingParams, StructuredOutputs
from llmasos.errors import InvalidRequestError

SAMPLES = 100
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "status", "address"],
    "additionalProperties": False,
}
ARRAYS = {
    "type": "object",
    "properties": {
        "points": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": -10, "maximum": 10}, "ok": {"type": "boolean"}},
                "required": ["x", "ok"],
                "additionalProperties": False,
            },
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["points", "tags"],
    "additionalProperties": False,
}
PATTERNS = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "kind": {"const": "order"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
        "day": {"type": "string", "format": "date"},
        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
    },
    "required": ["id", "kind", "note", "day", "price"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path, _ = make_hf_model(tmp_path_factory.mktemp("structured") / "tiny", num_key_value_heads=2, max_position_embeddings=1024)
    write_bpe_tokenizer(path)
    return LLM.load(path, max_batch_size=16)


def samples(llm, structured, n=SAMPLES, max_tokens=400, prompt="Once upon a time"):
    """n sampled outputs (temperature 1, a seed each), all in one engine run (16 at a time)."""
    engine = llm.engine
    outs = [
        engine.add(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, structured=structured))
        for i in range(n)
    ]
    return engine.run(outs)


@pytest.mark.parametrize("schema", [NESTED, ARRAYS, PATTERNS], ids=["nested-enum-required", "arrays-numbers", "patterns"])
def test_every_sample_parses_and_validates(llm, schema):
    outs = samples(llm, {"json": schema})
    for out in outs:
        assert out.finish_reason == "stop", out.text  # the grammar ended it, within max_tokens
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in outs}) > SAMPLES // 2  # samples, not one answer repeated


def test_regex_and_choice(llm):
    for out in samples(llm, {"regex": r"[0-9]{3}-[a-z]{2,5}"}, n=30):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", out.text) and out.finish_reason == "stop"
    choices = ["red", "green", "blue sky", "naïve"]
    texts = [out.text for out in samples(llm, StructuredOutputs(choice=choices), n=30)]
    assert set(texts) <= set(choices) and len(set(texts)) > 1


def test_json_object_is_an_object(llm):
    outs = samples(llm, {"json_object": True}, n=16, max_tokens=600)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished
    for out in finished:
        assert isinstance(json.loads(out.text), dict)
    for out in outs:  # one cut short by max_tokens is still the start of an object
        assert out.text.startswith("{")


def test_a_constrained_and_a_free_request_share_a_batch(llm):
    greedy = dict(max_tokens=40, temperature=0, ignore_eos=True)
    free_alone = llm.generate("Once upon a time", SamplingParams(**greedy))[0]
    constrained = SamplingParams(**greedy, structured={"json": NESTED})
    constrained_alone = llm.generate("The quick brown fox", constrained)[0]
    engine = llm.engine
    both = [engine.add("The quick brown fox", constrained), engine.add("Once upon a time", SamplingParams(**greedy))]
    engine.step()
    assert engine.num_running == 2  # one batch
    engine.run(both)
    assert both[1].token_ids == free_alone.token_ids and both[0].token_ids == constrained_alone.token_ids
    assert both[0].text.startswith('{"name": "')


def test_n_samples_and_logprobs_under_a_grammar(llm):
    out = llm.generate("hi", SamplingParams(max_tokens=300, n=4, seed=3, logprobs=2, structured={"json": NESTED}))[0]
    assert len({c.text for c in out.outputs}) > 1
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), NESTED)
        assert all(lp.logprob <= 0 for lp in c.logprobs)


def test_a_sentencepiece_vocabulary(tmp_path):
    path, _ = make_hf_model(tmp_path / "sp", vocab_size=500, max_position_embeddings=1024)
    write_sp_tokenizer(path)
    llm = LLM.load(path)
    for out in samples(llm, {"json": NESTED}, n=16):
        jsonschema.validate(json.loads(out.text), NESTED)


@pytest.mark.parametrize(
    "structured, words",
    [
        ({"json": {"type": "array", "uniqueItems": True}}, ["uniqueItems"]),
        ({"json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, ["not", "properties.a.not"]),
        ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, ["strin"]),
        ({"json": {"type": "string", "format": "favourite-colour"}}, ["favourite-colour"]),
        ({"json": {"type": "integer", "minimum": 5, "maximum": 2}}, ["minimum"]),
        ({"json": "{not json"}, ["not valid JSON"]),
        ({"json": [1, 2]}, ["object"]),
        ({"regex": "(unclosed"}, ["unclosed"]),
        ({"choice": []}, ["non-empty"]),
        ({"grammar": "start: nowhere"}, ["nowhere"]),
        ({"json": {}, "regex": "a"}, ["exactly one", "json, regex"]),
        ({"schema": {}}, ["unknown key 'schema'"]),
    ],
)
def test_a_constraint_that_cannot_be_enforced_is_refused_by_name(llm, structured, words):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(structured=structured)
    message = str(info.value)
    assert all(w in message for w in words), message
    assert info.value.param.startswith("structured")
    assert not llm.engine.has_work()


def test_masks_computed_during_the_forward_pass_give_the_same_tokens(llm):
    """The accelerator path (masks on a worker thread while the forward pass runs), here on the CPU."""
    from llmasos.inference.structured import Grammars

    params = SamplingParams(max_tokens=200, temperature=1.0, seed=5, n=3, structured={"json": ARRAYS})
    inline = llm.generate(["hi", "there"], params)
    engine = llm.engine
    engine.grammars, inline_grammars = Grammars(llm.tokenizer, llm.config.vocab_size, overlap=True), engine.grammars
    try:
        overlapped = llm.generate(["hi", "there"], params)
    finally:
        engine.grammars = inline_grammars
    assert [c.token_ids for o in overlapped for c in o.outputs] == [c.token_ids for o in inline for c in o.outputs]


def test_the_python_api_compiles_a_grammar_once_in_the_callers_thread_before_queueing(llm, monkeypatch):
    from llmasos.inference import structured

    calls, compile_grammar = [], structured.compile_grammar
    engine = llm.engine

    def recording(ll, grammar):
        calls.append((threading.current_thread(), len(engine.waiting)))
        return compile_grammar(ll, grammar)

    monkeypatch.setattr(structured, "compile_grammar", recording)
    params = SamplingParams(max_tokens=20, temperature=0, n=2, structured={"regex": r"[0-9]{2}-python-api"})
    first = llm.generate(["hi", "there"], params)
    again = llm.generate(["hi"], params)
    assert calls == [(threading.current_thread(), 0)]  # once, here, with nothing queued yet; then kept
    assert {c.text for o in first + again for c in o.outputs} <= {f"{i:02d}-python-api" for i in range(100)}


def test_compiled_grammars_are_shared_between_threads_and_the_least_recently_used_go(llm, monkeypatch):
    from llmasos.inference import structured
    from llmasos.inference.structured import MAX_COMPILED, Grammars

    grammars = Grammars(llm.tokenizer, llm.config.vocab_size)
    grammars.warm()
    same = StructuredOutputs(regex=r"[a-z]{4}-shared")
    start = threading.Barrier(8)

    def compile_at_once():
        start.wait()
        return grammars.compile(same)

    with ThreadPoolExecutor(8) as pool:
        templates = list(pool.map(lambda _: compile_at_once(), range(8)))
    assert all(t is templates[0] for t in templates)  # one template kept, whichever thread compiled first
    assert grammars.compile(same) is templates[0]
    compiled, compile_grammar = [], structured.compile_grammar
    monkeypatch.setattr(structured, "compile_grammar", lambda ll, g: (compiled.append(g), compile_grammar(ll, g))[1])
    others = [StructuredOutputs(regex=f"[a-z]{{{i + 1}}}-lru") for i in range(MAX_COMPILED)]
    for s in others[:-1]:
        grammars.compile(s)
    grammars.compile(same)  # used again: now the most recent
    grammars.compile(others[-1])  # one too many: the least recently used, others[0], goes
    assert len(grammars._compiled) == MAX_COMPILED
    compiled.clear()
    assert grammars.compile(same) is templates[0] and grammars.compile(others[1]) is not None
    assert compiled == []  # both kept
    grammars.compile(others[0])
    assert compiled == [others[0].compiled]  # compiled again


def test_steps_without_a_constrained_request_skip_the_grammars(llm, monkeypatch):
    engine = llm.engine
    calls = []
    for name in ("prepare", "mask"):
        original = getattr(engine.grammars, name)
        monkeypatch.setattr(engine.grammars, name, lambda *a, _name=name, _f=original: (calls.append(_name), _f(*a))[1])
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = llm.generate(["hi", "there"], free)
    assert calls == [] and engine.num_constrained == 0
    constrained = SamplingParams(max_tokens=8, temperature=0, structured={"regex": "[a-z]{30}"})
    both = engine.run([engine.add("hi", constrained), engine.add("there", free)])
    assert {"prepare", "mask"} <= set(calls) and engine.num_constrained == 0  # counted down as it finished
    assert re.fullmatch("[a-z]+", both[0].text) and both[1].token_ids == alone[1].token_ids
    aborted = engine.add("hi", constrained)
    engine.step()
    assert engine.num_constrained == 1
    engine.abort(aborted.request_id)
    assert engine.num_constrained == 0
    calls.clear()
    assert llm.generate(["hi", "there"], free)[1].token_ids == alone[1].token_ids and calls == []
