"""A request's structured-output fields as one `StructuredOutputs`, with every error naming the request's own field.

OpenAI's `response_format` ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and its newer
`structured_outputs` ({"json" | "regex" | "choice" | "grammar" | "json_object": ...}); at most one of them. The
schema is checked and turned into llguidance's grammar here, on the event loop, before any work: it takes about a
millisecond. Compiling that grammar for the model's vocabulary is done next, on a worker thread (`Service.structured`).
"""

from __future__ import annotations

import re
from typing import Any

from llmasos.errors import InvalidRequestError
from llmasos.inference.structured import KINDS, StructuredOutputError, StructuredOutputs
from llmasos.serving import schemas as s

SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _bad(field: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field}: {message}", param=field)


def _response_format(fmt: s.ResponseFormat) -> tuple[str, dict[str, Any]] | None:
    """(the field that holds the constraint, StructuredOutputs' arguments), or None for plain text."""
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "response_format", {"json_object": True}
    if fmt.type != "json_schema":
        raise _bad("response_format.type", f'must be "text", "json_object" or "json_schema", got {fmt.type!r}')
    spec = fmt.json_schema
    if spec is None:
        raise _bad("response_format.json_schema", 'is required with type "json_schema": {"name": ..., "schema": {...}}')
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and SCHEMA_NAME.match(name)):
        raise _bad("response_format.json_schema.name", f"must be 1 to 64 letters, digits, underscores or dashes, got {name!r}")
    for key, kind in (("strict", bool), ("description", str)):
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise _bad(f"response_format.json_schema.{key}", f"must be a {kind.__name__}")
    if "schema" not in spec:
        raise _bad("response_format.json_schema.schema", "is required: the JSON Schema the answer must follow")
    return "response_format.json_schema.schema", {"json": spec["schema"]}


def structured_outputs(body: s.SamplingFields) -> StructuredOutputs | None:
    """The request's constraint, or None. Raises InvalidRequestError naming the field that is wrong."""
    given: list[tuple[str, dict[str, Any]]] = []
    if body.response_format is not None:
        found = _response_format(body.response_format)
        if found is not None:
            given.append(found)
    for name, kind in GUIDED.items():
        value = getattr(body, name)
        if value is not None:
            given.append((name, {kind: value}))
    if body.structured_outputs is not None:
        spec = body.structured_outputs
        kinds = [k for k in KINDS if spec.get(k) not in (None, False)]
        unknown = sorted(set(spec) - set(KINDS))
        if unknown:
            raise _bad(f"structured_outputs.{unknown[0]}", f"unknown; give one of {', '.join(KINDS)}")
        if len(kinds) != 1:
            raise _bad("structured_outputs", f"give exactly one of {', '.join(KINDS)}")
        given.append((f"structured_outputs.{kinds[0]}", {kinds[0]: spec[kinds[0]]}))
    if not given:
        return None
    if len(given) > 1:
        fields = [field.split(".")[0] for field, _ in given]
        raise _bad(fields[1], f"give one structured-output field, not {' and '.join(fields)}")
    field, kwargs = given[0]
    try:
        return StructuredOutputs(**kwargs)
    except StructuredOutputError as e:
        raise _bad(field, e.detail) from None
