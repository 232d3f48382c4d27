"""`POST /v1/embeddings`, in OpenAI's shape, on the engine that generates (`inference.embedding`).

`input` is a text, a list of texts, a list of token ids or a list of such lists; each is embedded alone (no
truncation: an input longer than the context is a 400 naming its index). `encoding_format` "float" answers
lists of numbers, "base64" the little-endian float32 bytes (what the `openai` client asks for by default).
`dimensions` keeps the first that many values of each embedding and renormalises them, as OpenAI's
text-embedding-3 models shorten theirs: meaningful for a Matryoshka-trained model, allowed for any (1 up to
the hidden size; beyond it a 400). `model` may name a LoRA adapter loaded on the server.
"""

from __future__ import annotations

import asyncio
import base64
import json

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmasos.errors import ContextLengthError, InvalidRequestError
from llmasos.inference.embedding import EmbeddingRequest, check_dimensions, shorten
from llmasos.serving import schemas as s


def add_routes(app: FastAPI, router) -> None:
    """Add the route to `app`, over `router` (the app's `Router`, which leases the model a request names: passed
    in, so this module need not import the app)."""

    @app.post("/v1/embeddings")
    async def embeddings(body: s.EmbeddingRequest, request: Request) -> Response:
        async with router.service(body.model, request) as service:
            return await create(service, body, request)


async def create(service, body: s.EmbeddingRequest, request: Request) -> Response:
    adapter = service.check_model(body.model)
    check_dimensions(body.dimensions, service.llm.config.hidden_size)
    pooling = service.llm.pooling  # a pooling the model's files name that we cannot compute is a 400 naming the file
    given = body.input
    if isinstance(given, str):
        given = [given]
    if not given:
        raise InvalidRequestError("input is empty: send at least one text or list of token ids", param="input")
    if isinstance(given[0], int):
        given = [given]
    if isinstance(given[0], str):
        for i, text in enumerate(given):
            if not text:
                raise InvalidRequestError(f"input[{i}] is empty", param=f"input[{i}]")
            if len(text) > service.max_chars:  # refused before spending time on encoding it
                raise ContextLengthError(
                    f"input[{i}] has {len(text):,} characters: far more than the context of "
                    f"{service.llm.engine.max_seq_len} tokens can hold",
                    param=f"input[{i}]",
                )
        inputs = await asyncio.to_thread(lambda: [service.tokenizer.encode(t) for t in given])
    else:
        inputs = given  # token ids: checked by the engine
    req, done = await service.worker.embed(inputs, pooling, adapter)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            service.worker.abort(req.request_id)
            return Response(status_code=499)
    finally:
        gone.cancel()
    if req.error == "aborted":
        return _error(503, "server_overloaded", "the request was aborted: the server is stopping", "aborted")
    if req.error is not None:
        service.metrics.unexpected_errors.inc()  # the engine logged why
        return _error(500, "server_error", "embedding failed (the server's log has the details)", "internal_error")
    content = await asyncio.to_thread(_response, req, body, body.model or service.model_name)
    return Response(content, media_type="application/json")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(status: int, kind: str, message: str, code: str) -> JSONResponse:
    return JSONResponse(s.ErrorResponse(error=s.ErrorInfo(message=message, type=kind, code=code)).model_dump(), status)


def _response(req: EmbeddingRequest, body: s.EmbeddingRequest, model: str) -> bytes:
    """The JSON body, built off the event loop (16 MB of floats takes seconds)."""
    vectors = shorten(torch.stack(req.embeddings), body.dimensions)  # type: ignore[arg-type]
    if body.encoding_format == "base64":
        values: list = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        values = vectors.tolist()
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)]
    tokens = req.prompt_tokens
    return json.dumps(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    ).encode()
