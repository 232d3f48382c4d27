"""/v1/embeddings with the official `openai` client (and raw HTTP where the client hides things) against the
shared live server: the same vectors as `LLM.embed`, in both encodings, and the inputs it refuses."""

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

TEXTS = ["Once upon a time", "def fibonacci(n):", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The served model loaded again here, for the expected values (the server's own engine belongs to its thread)."""
    from llmasos import LLM

    return LLM.load(tiny_dir)


def test_embeddings_equal_llm_embed_in_both_encodings(client, local):
    expected = local.embed(TEXTS)
    floats = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    packed = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    for out in (floats, packed):
        assert out.object == "list" and out.model == "tiny" and [d.index for d in out.data] == [0, 1, 2]
        got = torch.tensor([d.embedding for d in out.data])
        assert got.shape == (3, 64) and (got - expected).abs().max() < 1e-6
    tokens = sum(len(local.tokenizer.encode(t)) for t in TEXTS)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens


def test_base64_is_little_endian_float32(http, local):
    body = http.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert body["data"][0]["object"] == "embedding" and body["model"] == "tiny"
    assert np.abs(vector - local.embed("hello")[0].numpy()).max() < 1e-6


def test_token_ids_and_lists_of_them(client, local):
    ids = [local.tokenizer.encode(t) for t in TEXTS]
    one = client.embeddings.create(model="tiny", input=ids[0], encoding_format="float")
    many = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
    assert len(one.data) == 1 and len(many.data) == 3
    assert (torch.tensor(one.data[0].embedding) - torch.tensor(many.data[0].embedding)).abs().max() < 1e-6  # alone, batched
    assert (torch.tensor([d.embedding for d in many.data]) - local.embed(ids)).abs().max() < 1e-6
    assert one.usage.prompt_tokens == len(ids[0])


def test_dimensions_shorten_and_renormalise(client, local):
    out = client.embeddings.create(model="tiny", input=TEXTS[:2], dimensions=8, encoding_format="float")
    got = torch.tensor([d.embedding for d in out.data])
    assert got.shape == (2, 8) and (got - F.normalize(local.embed(TEXTS[:2])[:, :8], dim=-1)).abs().max() < 1e-6


@pytest.mark.parametrize(
    "body, status, param, message",
    [
        ({"input": ["short", "x" * 80_000]}, 400, "input[1]", "input[1] has 80,000 characters"),
        ({"input": [[1, 2], [5] * 1025]}, 400, "input[1]", "input[1] has 1025 tokens; the context holds 1024"),
        ({"input": []}, 400, "input", "input is empty"),
        ({"input": ["a", ""]}, 400, "input[1]", "input[1] is empty"),
        ({"input": [[1], [2, 99999]]}, 400, "input[1]", "token ids must be integers in [0, 400)"),
        ({"input": "a", "dimensions": 0}, 400, "dimensions", "from 1 to the model's 64"),
        ({"input": "a", "dimensions": 65}, 400, "dimensions", "from 1 to the model's 64"),
        ({"input": "a", "encoding_format": "int8"}, 422, "encoding_format", "encoding_format"),
        ({"input": "a", "model": "text-embedding-3-small"}, 404, "model", "does not exist"),
    ],
)
def test_bad_requests_name_the_field(http, body, status, param, message):
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_the_client_sees_a_context_overflow_as_a_bad_request(client):
    import openai

    with pytest.raises(openai.BadRequestError, match=r"input\[0\] has 2000 tokens"):
        client.embeddings.create(model="tiny", input=[[7] * 2000])
