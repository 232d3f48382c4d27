"""The server's own OpenAPI schema, fuzzed with schemathesis against the live tiny-model server: whatever a
client sends, the answer is never a 5xx. Derandomized and bounded in examples per route, so it takes about
a minute and finds the same things every run."""

import pytest
from helpers import API_KEY
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[test]')")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = 60  # per route


def test_no_request_the_schema_allows_is_a_server_error(server):
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case) -> None:
            case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=60)

        no_server_error()
