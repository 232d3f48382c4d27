"""The OpenAI-compatible server: `create_app(llm)` builds the FastAPI app, `serve` runs it with uvicorn.

One model or a whole store of them (`create_app(pool)`), many clients: each request names a model, which
the pool (`pool`) loads if it is not loaded and hands to that model's handlers (`Service`); every request
of a model goes to its continuous-batching engine, which one background thread owns (`engine_thread`).
Handlers validate, tokenize and format; the engine threads compute. Ollama's API (`ollama`) is served
beside OpenAI's, over the same models.
Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and a client mistake is
always a 4xx that leaves the server serving.

What keeps one request from hurting another: every value is checked before any work (`SamplingParams`);
text that cannot fit the context is refused before it is encoded, and encoding and chat templates run on
worker threads, so the event loop always answers; every prompt, scored or generated, is admitted through
the engine's queue; the engine fails a request that raises by itself; and an unexpected error is a bare
500 (logged, counted) that never shows the exception.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import ipaddress
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from llmasos.errors import ContextLengthError, InvalidRequestError, LLMasOSError
from llmasos.inference import LLM, SamplingParams
from llmasos.inference import adapters as lora
from llmasos.inference.engine import RequestOutput, TokenLogprob
from llmasos.inference.structured import StructuredOutputs
from llmasos.inference.tools import ToolPlan, plan_tools
from llmasos.models.multi_lora import Adapter, projections
from llmasos.serving import adapters, embeddings, tools
from llmasos.serving import schemas as s
from llmasos.serving.engine_thread import EngineFailure, EngineThread, QueueFullError, Stream
from llmasos.serving.metrics import Metrics, ModelMetrics
from llmasos.serving.ollama import OLLAMA_ROUTES, add_ollama_routes
from llmasos.serving.pool import (
    Catalog,
    ClientGone,
    InsufficientMemoryError,
    LoadCancelled,
    LoadOptions,
    ModelLoadError,
    ModelNotFoundError,
    ModelPool,
    available_memory,
    parse_keep_alive,
)
from llmasos.serving.structured import structured_outputs

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
# A token is never longer than the tokenizer's longest piece, so text longer than the context times that
# cannot fit; below 64 characters a token, normalizers that drop characters could still make it fit.
MIN_CHARS_PER_TOKEN = 64
# Logprob entries one echo+logprobs request may ask for (prompt tokens x (1 + alternatives)): ~15 MB of JSON.
MAX_SCORED_ENTRIES = 2**18
ROUTES = {
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    *OLLAMA_ROUTES,
}
# What --api-key guards; the page, /health and /metrics stay open.
PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize", "/tokenizer_info", "/docs", "/redoc", "/openapi.json")
LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost", "ip6-loopback"}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_overloaded",
}


def is_loopback(host: str) -> bool:
    """A loopback name or address, as a Host header or a bind address carries it (port and brackets allowed)."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # 127.0.0.1:8000, localhost:8000
        host = host.partition(":")[0]
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class APIError(Exception):
    """An error answered in OpenAI's shape (in Ollama's, `{"error": message}`, under /api/)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self, path: str = "") -> JSONResponse:
        if path.startswith("/api/"):
            return JSONResponse({"error": self.message}, self.status, headers=self.headers)
        info = s.ErrorInfo(
            message=self.message, type=ERROR_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
        )
        return JSONResponse(s.ErrorResponse(error=info).model_dump(), self.status, headers=self.headers)


# ---- middleware (plain ASGI: no buffering of streamed responses) ------------------------------------


class Guard:
    """The Host header, the API key and the body-size limit, checked before any routing or parsing.

    loopback_only: answer only requests addressed to a loopback name, so that a web page whose domain
    an attacker re-points at 127.0.0.1 (DNS rebinding) cannot reach a server bound to loopback."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, loopback_only: bool = False):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.loopback_only = loopback_only

    def authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback_only and not is_loopback(headers.get("host", "")):
            error = APIError(
                400,
                "the Host header must name this machine (localhost or a loopback address): the server is bound to loopback",
                code="invalid_host",
            )
            return await error.response(scope["path"])(scope, receive, send)
        if self.api_key and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED) and not self.authorized(headers):
            error = APIError(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await error.response(scope["path"])(scope, receive, send)
        too_large = f"the request body is larger than {self.max_body_bytes} bytes"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await APIError(413, too_large, code=HTTP_CODES[413]).response(scope["path"])(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # a chunked body that declared no length
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


def unexpected(metrics: Metrics | ModelMetrics, where: str) -> str:
    """Log the exception being handled under a new id, count it, and return what the client may read."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("unexpected error %s in %s", error_id, where)
    metrics.unexpected_errors.inc()
    return f"internal server error (id {error_id}; the server's log has the details)"


class CatchAll:
    """An unexpected error (a bug: there should be none) is logged with an id and counted; the client gets a
    500 in OpenAI's shape with that id and nothing of the exception. Inside CORS, so browsers can read it."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            message = unexpected(self.metrics, f"{scope['method']} {scope['path']}")
            if not started:  # a stream already under way can only be cut
                await APIError(500, message, code="internal_error").response(scope["path"])(scope, receive, send)


class CountRequests:
    """Counts answers by route and status for /metrics (499: the client left before the answer)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted_send)


# ---- the routes --------------------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(outputs: list[RequestOutput]) -> s.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(o.num_generated for o in outputs)
    cached = s.PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in outputs))
    return s.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, prompt_tokens_details=cached
    )


def _timings(outputs: list[RequestOutput]) -> s.Timings | None:
    if any(o.first_token_at is None or o.finished_at is None for o in outputs):
        return None  # aborted before its first token
    first = max(o.first_token_at for o in outputs)
    prompt_s, predicted_s = first - min(o.arrival for o in outputs), max(o.finished_at for o in outputs) - first
    cache_n = sum(o.num_cached_tokens for o in outputs)
    prompt_n = sum(len(o.prompt_token_ids) for o in outputs) - cache_n
    predicted_n = sum(o.num_generated for o in outputs)
    after_first = predicted_n - sum(len(o.outputs) for o in outputs)
    return s.Timings(
        cache_n=cache_n,
        prompt_n=prompt_n,
        prompt_ms=prompt_s * 1e3,
        prompt_per_second=prompt_n / prompt_s if prompt_s > 0 else None,
        predicted_n=predicted_n,
        predicted_ms=predicted_s * 1e3,
        predicted_per_second=after_first / predicted_s if predicted_s > 0 and after_first > 0 else None,
    )


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


class Service:
    """The handlers of one loaded model, over the thread that runs its engine (`Router` picks the model)."""

    def __init__(self, llm: LLM, worker: EngineThread, metrics: ModelMetrics, model_name: str):
        self.llm, self.worker, self.metrics, self.model_name = llm, worker, metrics, model_name
        self.tokenizer = llm.tokenizer
        self.created = int(time.time())
        self.piece = functools.lru_cache(maxsize=1 << 16)(lambda token: self.tokenizer.decode([token], skip_special_tokens=False))
        self.max_chars = llm.engine.max_seq_len * max(MIN_CHARS_PER_TOKEN, self.tokenizer.max_token_chars)
        self.projections = projections(llm.model)  # what a LoRA adapter may target, for checking one before loading it

    # ---- shared steps ----

    def check_model(self, name: str | None) -> Adapter | None:
        """The LoRA adapter `name` picks (None: the base model, also as Ollama's `name:latest`), or a 404 naming
        what is served."""
        if name is None or self.model_name in (name, name.removesuffix(":latest")):
            return None
        adapter = lora.get(self.llm.model, name)
        if adapter is None:
            served = ", ".join(f"`{n}`" for n in [self.model_name, *lora.names(self.llm.model)])
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves {served}.",
                param="model",
                code="model_not_found",
            )
        return adapter

    @staticmethod
    def sampling(
        body: s.SamplingFields,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        structured: StructuredOutputs | None = None,
    ) -> SamplingParams:
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            n=body.n,
            structured=structured,
        )

    async def structured(self, body: s.SamplingFields, tool_plan: ToolPlan | None = None) -> StructuredOutputs | None:
        """The request's grammar (its structured-output field, or a tool call it must make), compiled for this
        model's vocabulary on a worker thread, so that neither the event loop nor the engine's thread (which only
        copies it) waits for the compile, nor for llguidance's view of the vocabulary, built the first time (a
        second or so for a large vocabulary)."""
        structured = structured_outputs(body)
        if tool_plan is not None and tool_plan.structured is not None:
            if structured is not None:
                raise APIError(
                    400,
                    "tool_choice required (or a named function) cannot be combined with a structured-output field",
                    param="tool_choice",
                )
            structured = tool_plan.structured
        if structured is not None:
            await asyncio.to_thread(self.llm.engine.grammars.compile, structured)
        return structured

    def check_length(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit the context before spending time on encoding it."""
        if chars > self.max_chars:
            raise APIError(
                400,
                f"{param} has {chars:,} characters: far more than the context of "
                f"{self.llm.engine.max_seq_len} tokens can hold (at most {self.max_chars:,} characters)",
                param=param,
                code="context_length_exceeded",
            )

    async def encode(self, texts: list[str], param: str, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, encoded on a worker thread (a long text takes seconds)."""
        self.check_length(sum(map(len, texts)), param)
        return await asyncio.to_thread(lambda: [self.tokenizer.encode(t, add_special_tokens) for t in texts])

    async def chat_prompt(self, messages: list[s.ChatMessage], tool_plan: ToolPlan | None = None) -> list[int]:
        if not messages:
            raise APIError(400, "messages is empty: send at least one message", param="messages")
        turns = tools.template_turns(messages)
        self.check_length(tools.characters(turns), "messages")
        try:  # rendering a long conversation takes seconds too
            return await asyncio.to_thread(self.llm.chat_prompt, turns, tool_plan.tools if tool_plan else None)
        except InvalidRequestError:  # a tool call's arguments that are not JSON, named
            raise
        except LLMasOSError as e:  # the template refused the conversation (e.g. roles that do not alternate)
            raise APIError(400, str(e), param="messages") from None

    async def run_to_end(self, stream: Stream, request: Request) -> bool:
        """Wait for every request of `stream`; False (and everything aborted) if the client leaves first."""

        async def drain() -> None:
            async for _ in stream:
                pass

        done, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                return False
            done.result()  # an engine failure raises here
            return True
        finally:
            done.cancel()
            gone.cancel()
            stream.cancel()
            self.metrics.record(stream.outputs)

    def streaming(self, stream: Stream, chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
        """Server-sent events ending with `data: [DONE]`; an engine failure is sent as an error event first."""

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield _sse(chunk.model_dump_json())
            except EngineFailure:
                info = s.ErrorInfo(message=unexpected(self.metrics, "a stream"), type="server_error", code="internal_error")
                yield _sse(s.ErrorResponse(error=info).model_dump_json())
            finally:  # also when the client disconnects: this is what frees its rows at once
                stream.cancel()
                self.metrics.record(stream.outputs)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- /v1/completions ----

    async def completions(self, body: s.CompletionRequest, request: Request) -> Response:
        adapter = self.check_model(body.model)
        prompt = body.prompt
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
        if texts is not None:
            prompts = await self.encode(texts, "prompt")
        else:
            prompts = [prompt] if isinstance(prompt[0], int) else prompt  # ids are checked by the engine
        # echo with logprobs (lm-eval's log-likelihood) or with max_tokens 0: the prompt is scored too, in the
        # engine's queue like any prompt; max_tokens 0 generates nothing.
        scoring = body.echo and (body.logprobs is not None or body.max_tokens == 0)
        if scoring and body.logprobs:
            entries = sum(map(len, prompts)) * (1 + body.logprobs)
            if entries > MAX_SCORED_ENTRIES:
                raise APIError(
                    400,
                    f"scoring these prompts asks for {entries:,} logprob entries (prompt tokens x "
                    f"(1 + logprobs)); one request may ask for at most {MAX_SCORED_ENTRIES:,}: send "
                    "fewer prompts per request, or fewer logprobs",
                    param="prompt",
                )
        structured = await self.structured(body)
        params = self.sampling(body, body.max_tokens, body.logprobs, (body.logprobs or 0) if scoring else None, structured)
        stream = await self.worker.submit(prompts, params, adapter)
        if body.echo and texts is None:
            texts = await asyncio.to_thread(lambda: [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts])
        if body.stream:
            return self.streaming(stream, self.completion_chunks(body, stream, texts))
        if not await self.run_to_end(stream, request):
            return Response(status_code=499)
        return JSONResponse(self.completion_response(body, stream.outputs, texts).model_dump())

    def completion_logprobs(self, tokens: list[int], entries: list[TokenLogprob | None], into: s.CompletionLogprobs) -> None:
        offset = into.text_offset[-1] + len(into.tokens[-1]) if into.tokens else 0
        for token, entry in zip(tokens, entries):
            piece = self.piece(token)
            into.tokens.append(piece)
            into.text_offset.append(offset)
            offset += len(piece)
            into.token_logprobs.append(entry.logprob if entry else None)
            into.top_logprobs.append({self.piece(t): lp for t, lp in entry.top} if entry else None)

    def echoed(self, body: s.CompletionRequest, out: RequestOutput, text: str | None) -> tuple[str, s.CompletionLogprobs | None]:
        """The start of a choice's text: the prompt itself when echoing, with its logprobs."""
        logprobs = s.CompletionLogprobs() if body.logprobs is not None else None
        if not body.echo:
            return "", logprobs
        if logprobs is not None:
            self.completion_logprobs(out.prompt_token_ids, [None, *out.prompt_logprobs], logprobs)
        return text, logprobs

    def completion_response(
        self, body: s.CompletionRequest, outputs: list[RequestOutput], texts: list[str] | None
    ) -> s.CompletionResponse:
        choices = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                text, logprobs = self.echoed(body, out, texts[i] if body.echo else None)
                if logprobs is not None:
                    self.completion_logprobs(c.token_ids, c.logprobs or [], logprobs)
                choices.append(
                    s.CompletionChoice(
                        index=i * body.n + c.index, text=text + c.text, logprobs=logprobs, finish_reason=c.finish_reason
                    )
                )
        return s.CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model or self.model_name,
            choices=choices,
            usage=_usage(outputs),
            timings=_timings(outputs),
        )

    async def completion_chunks(
        self, body: s.CompletionRequest, stream: Stream, texts: list[str] | None
    ) -> AsyncIterator[s.CompletionResponse]:
        rid, created, outputs = f"cmpl-{uuid.uuid4().hex}", int(time.time()), stream.outputs
        model = body.model or self.model_name
        index = {o.request_id: i for i, o in enumerate(outputs)}
        seen = [[0] * body.n for _ in outputs]  # tokens already sent, per choice
        left = len(outputs) * body.n
        prompt_sent: set[int] = set()

        def chunk(choices: list[s.CompletionChoice], last: bool = False) -> s.CompletionResponse:
            return s.CompletionResponse(
                id=rid, created=created, model=model, choices=choices, timings=_timings(outputs) if last else None
            )

        async for d in stream:
            i = index[d.request.request_id]
            if body.echo and i not in prompt_sent:  # the prompt's logprobs exist once it has been prefilled
                prompt_sent.add(i)
                text, logprobs = self.echoed(body, d.request, texts[i])
                yield chunk([s.CompletionChoice(index=i * body.n + j, text=text, logprobs=logprobs) for j in range(body.n)])
            c = d.request.outputs[d.index]
            logprobs = None
            if body.logprobs is not None:
                start, seen[i][d.index] = seen[i][d.index], seen[i][d.index] + len(d.token_ids)
                logprobs = s.CompletionLogprobs()
                self.completion_logprobs(d.token_ids, c.logprobs[start : start + len(d.token_ids)], logprobs)
            if d.text or d.finished or logprobs is not None:
                left -= d.finished
                yield chunk(
                    [
                        s.CompletionChoice(
                            index=i * body.n + d.index,
                            text=d.text,
                            logprobs=logprobs,
                            finish_reason=c.finish_reason if d.finished else None,
                        )
                    ],
                    left == 0,
                )
        if body.stream_options and body.stream_options.include_usage:
            yield s.CompletionResponse(
                id=rid, created=created, model=model, choices=[], usage=_usage(outputs), timings=_timings(outputs)
            )

    # ---- /v1/chat/completions ----

    async def chat(self, body: s.ChatCompletionRequest, request: Request) -> Response:
        adapter = self.check_model(body.model)
        plan = plan_tools(self.tokenizer, body.tools, body.tool_choice, body.parallel_tool_calls)
        structured = await self.structured(body, plan)
        prompt = await self.chat_prompt(body.messages, plan)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        new_name = body.max_completion_tokens is not None
        try:
            params = self.sampling(
                body,
                body.max_completion_tokens if new_name else body.max_tokens,
                (body.top_logprobs or 0) if body.logprobs else None,
                structured=structured,
            )
            stream = await self.worker.submit([prompt], params, adapter)
        except InvalidRequestError as e:  # name the field this request used, not the engine's
            fields = {
                "prompt": "messages",
                "logprobs": "top_logprobs",
                "max_tokens": "max_completion_tokens" if new_name else "max_tokens",
            }
            e.param = fields.get(e.param, e.param)
            raise
        if body.stream:
            return self.streaming(stream, self.chat_chunks(body, stream, plan))
        if not await self.run_to_end(stream, request):
            return Response(status_code=499)
        out = stream.outputs[0]
        choices = [
            s.ChatChoice(
                index=c.index,
                message=tools.message(plan, c, self.tokenizer),
                logprobs=self.chat_logprobs(c.logprobs) if body.logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in out.outputs
        ]
        return JSONResponse(
            s.ChatCompletionResponse(
                id=f"chatcmpl-{uuid.uuid4().hex}",
                created=int(time.time()),
                model=body.model or self.model_name,
                choices=choices,
                usage=_usage([out]),
                timings=_timings([out]),
            ).model_dump()
        )

    def chat_logprobs(self, entries: list[TokenLogprob]) -> s.ChatLogprobs:
        def top(token: int, logprob: float) -> s.TopLogprob:
            piece = self.piece(token)
            return s.TopLogprob(token=piece, logprob=logprob, bytes=list(piece.encode()))

        return s.ChatLogprobs(
            content=[
                s.TokenLogprobEntry(**top(e.token_id, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
                for e in entries
            ]
        )

    async def chat_chunks(
        self, body: s.ChatCompletionRequest, stream: Stream, plan: ToolPlan | None = None
    ) -> AsyncIterator[s.ChatCompletionChunk]:
        rid, created, outputs = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), stream.outputs
        seen, left = [0] * body.n, body.n
        calls = [tools.StreamedCalls(plan, self.tokenizer) for _ in range(body.n)] if plan else None

        def chunk(choices: list[s.ChatChunkChoice], **extra: Any) -> s.ChatCompletionChunk:
            return s.ChatCompletionChunk(id=rid, created=created, model=body.model or self.model_name, choices=choices, **extra)

        yield chunk([s.ChatChunkChoice(index=j, delta=s.ChatDelta(role="assistant", content="")) for j in range(body.n)])
        async for d in stream:
            c = d.request.outputs[d.index]
            logprobs = None
            if body.logprobs:
                start, seen[d.index] = seen[d.index], seen[d.index] + len(d.token_ids)
                logprobs = self.chat_logprobs(c.logprobs[start : start + len(d.token_ids)])
            if calls is not None:  # tools: content and calls as the reader finds them
                deltas = calls[d.index].deltas(d.token_ids, d.finished)
                finish = calls[d.index].finish_reason(c) if d.finished else None
                if d.finished or logprobs is not None:
                    deltas = deltas or [s.ChatDelta()]
                left -= d.finished
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    yield chunk(
                        [
                            s.ChatChunkChoice(
                                index=d.index,
                                delta=delta,
                                logprobs=logprobs if k == 0 else None,
                                finish_reason=finish if last else None,
                            )
                        ],
                        timings=_timings(outputs) if left == 0 and last else None,
                    )
            elif d.text or d.finished or logprobs is not None:
                left -= d.finished
                yield chunk(
                    [
                        s.ChatChunkChoice(
                            index=d.index,
                            delta=s.ChatDelta(content=d.text),
                            logprobs=logprobs,
                            finish_reason=c.finish_reason if d.finished else None,
                        )
                    ],
                    timings=_timings(outputs) if left == 0 else None,
                )
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=_usage(outputs), timings=_timings(outputs))

    # ---- the small routes ----

    def adapter_cards(self) -> list[s.ModelCard]:
        """Each LoRA adapter loaded on this model, as `/v1/models` lists it (`parent`: this model)."""
        length = self.llm.engine.max_seq_len
        return [
            s.ModelCard(id=a.name, created=self.created, max_model_len=length, root=str(a.path), parent=self.model_name)
            for a in lora.loaded(self.llm.model)
        ]

    async def tokenize(self, body: s.TokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt")
        if body.messages is not None:
            tokens = await self.chat_prompt(body.messages)
        else:
            tokens = (await self.encode([body.prompt], "prompt", body.add_special_tokens))[0]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.llm.engine.max_seq_len}

    async def detokenize(self, body: s.DetokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        vocab = self.llm.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens holds the id {str(bad)[:40]}; ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, body.tokens)}

    async def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's route, which lm-eval's `tokenizer_backend=remote` reads (with /tokenize and /detokenize)."""
        tok = self.tokenizer
        return {
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "model_max_length": self.llm.engine.max_seq_len,
            "chat_template": tok.chat_template,
        }


# ---- the routes over every model -------------------------------------------------------------------


class Router:
    """The routes over every model: each request's model is leased from the pool (loaded first if it is not)
    and its handling handed to that model's `Service`."""

    def __init__(self, pool: ModelPool, metrics: Metrics):
        self.pool, self.metrics = pool, metrics
        self.created = int(time.time())

    @asynccontextmanager
    async def service(
        self, name: str | None, request: Request, keep_alive: float | str | None = None, reset: bool = True
    ) -> AsyncIterator[Any]:
        """The Service of model `name`, held for the block. Raises ClientGone if the client leaves while its
        model loads (the load is cancelled when no one else waits for it). reset: a request without
        keep_alive sets the server's default (Ollama's rule for generation); False leaves it as it is."""
        keep = None if keep_alive is None else parse_keep_alive(keep_alive)
        async with self.pool.lease(name, keep, gone=lambda: _disconnected(request), reset=reset) as entry:
            yield entry.service

    def unexpected(self, where: str) -> str:
        return unexpected(self.metrics, where)

    # ---- per model ----

    async def completions(self, body: s.CompletionRequest, request: Request) -> Response:
        async with self.service(body.model, request, body.keep_alive) as service:
            return await service.completions(body, request)

    async def chat(self, body: s.ChatCompletionRequest, request: Request) -> Response:
        async with self.service(body.model, request, body.keep_alive) as service:
            return await service.chat(body, request)

    async def tokenize(self, body: s.TokenizeRequest, request: Request) -> dict[str, Any]:
        async with self.service(body.model, request, reset=False) as service:
            return await service.tokenize(body)

    async def detokenize(self, body: s.DetokenizeRequest, request: Request) -> dict[str, Any]:
        async with self.service(body.model, request, reset=False) as service:
            return await service.detokenize(body)

    async def tokenizer_info(self, request: Request, model: str | None = None) -> dict[str, Any]:
        async with self.service(model, request, reset=False) as service:
            return await service.tokenizer_info()

    # ---- the server ----

    async def models(self) -> s.ModelList:
        """Every model this server serves, loaded or not."""
        cards = []
        for name in self.pool.names():
            entry = self.pool.loaded.get(name)
            if entry is not None and entry.llm is not None:
                length, created = entry.llm.engine.max_seq_len, self.created
            else:
                info = self.pool.catalog.describe(name, self.pool.path(name))
                config = info["config"]
                length = None if config is None else config.max_position_embeddings
                if config is not None and self.pool.options.max_model_len:
                    length = min(length, self.pool.options.max_model_len)
                created = int(info["modified"])
            cards.append(s.ModelCard(id=name, created=created, max_model_len=length))
            if entry is not None and entry.service is not None:
                cards.extend(entry.service.adapter_cards())
        return s.ModelList(data=cards)

    async def health(self) -> Response:
        stopped = [e.name for e in self.pool.entries() if not e.worker.alive]
        if stopped:
            return APIError(503, f"the engine thread of {', '.join(stopped)} has stopped").response()
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("llmasos.serving").joinpath("static/index.html").read_text("utf-8"))


# ---- the app ---------------------------------------------------------------------------------------


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 for a body that is not JSON or has a field of the wrong type, naming the field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(
            422, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", code="json_invalid"
        ).response(request.url.path)
    param = ".".join(loc) or None
    return APIError(422, f"{param or 'body'}: {err['msg']}", param=param, code=err.get("type")).response(request.url.path)


def create_app(
    llm: LLM | ModelPool,
    served_model_name: str = "llmasos",
    api_key: str | None = None,
    max_queue: int = 256,
    cors_origins: list[str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    loopback_only: bool = False,
    allow_runtime_lora: bool | None = None,
) -> FastAPI:
    """The app for one loaded model (an LLM, served as `served_model_name` for good), or for the models of
    a pool (loaded on demand). The engine threads start and stop with the app's lifespan.

    max_queue: sequences that may wait for a free row (the running batch is the engine's max_batch_size);
    beyond that a request gets 503 at once (a pool has its own, in its LoadOptions). cors_origins: browser
    origins allowed to call the API. loopback_only: refuse requests whose Host header is not a loopback name
    (`serve` sets it for a loopback bind). With api_key, the API docs need the key too. allow_runtime_lora:
    whether /v1/load_lora_adapter and /v1/unload_lora_adapter work (they read any dir the server can read);
    None: as $LLMASOS_ALLOW_RUNTIME_LORA says (off unless it is 1)."""
    if isinstance(llm, ModelPool):
        pool = llm
    else:
        clash = lora.get(llm.model, served_model_name)
        if clash is not None:
            raise LLMasOSError(f"the LoRA adapter {clash.path} is loaded as {served_model_name!r}, the served model's own name")
        pool = ModelPool(Catalog({served_model_name: llm.path}), LoadOptions(max_queue=max_queue))
    metrics = Metrics(pool.entries)
    pool.bind(lambda name, model, worker: Service(model, worker, metrics.model(name), name), metrics)
    if not isinstance(llm, ModelPool):
        pool.preload(served_model_name, llm)
    router = Router(pool, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # What is alive now (the model, torch, the libraries) stays: freezing it keeps Python's full garbage
        # collections, which hold the GIL, from walking it again (they stalled the event loop for 0.2 s).
        gc.collect()
        gc.freeze()
        await pool.start()
        yield
        await pool.close()

    app = FastAPI(title="LLMasOS", summary="OpenAI- and Ollama-compatible server", lifespan=lifespan)
    app.state.router = router
    app.state.pool = pool

    def handler(error: Callable[[Any], APIError]) -> Callable[[Request, Any], Response]:
        return lambda request, e: error(e).response(request.url.path)

    app.add_exception_handler(APIError, handler(lambda e: e))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(
        HTTPException,
        handler(lambda e: APIError(e.status_code, str(e.detail), code=HTTP_CODES.get(e.status_code), headers=e.headers)),
    )
    app.add_exception_handler(
        ContextLengthError, handler(lambda e: APIError(400, str(e), param=e.param, code="context_length_exceeded"))
    )
    app.add_exception_handler(ModelNotFoundError, handler(lambda e: APIError(404, str(e), param="model", code="model_not_found")))
    app.add_exception_handler(
        InsufficientMemoryError, handler(lambda e: APIError(400, str(e), param="model", code="insufficient_memory"))
    )
    app.add_exception_handler(ModelLoadError, handler(lambda e: APIError(500, str(e), code="model_load_failed")))
    app.add_exception_handler(ClientGone, lambda request, e: Response(status_code=499))
    app.add_exception_handler(  # `llmasos stop` while the model was loading
        LoadCancelled,
        handler(lambda e: APIError(503, "the model's load was cancelled (it was stopped); retry", code="load_cancelled")),
    )
    app.add_exception_handler(LLMasOSError, handler(lambda e: APIError(400, str(e), param=getattr(e, "param", None))))
    app.add_exception_handler(
        QueueFullError, handler(lambda e: APIError(503, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"}))
    )

    app.get("/", include_in_schema=False)(router.page)
    app.get("/health")(router.health)
    app.get("/metrics")(router.metrics_text)
    app.get("/v1/models")(router.models)
    app.post("/v1/completions")(router.completions)
    app.post("/v1/chat/completions")(router.chat)
    app.post("/tokenize")(router.tokenize)
    app.post("/detokenize")(router.detokenize)
    app.get("/tokenizer_info")(router.tokenizer_info)
    embeddings.add_routes(app, router)
    adapters.add_routes(app, router, adapters.runtime_lora_allowed(allow_runtime_lora))
    add_ollama_routes(app, router)

    app.add_middleware(CatchAll, metrics=metrics)  # innermost: its 500 is counted and passes through CORS
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, loopback_only=loopback_only)
    app.add_middleware(CountRequests, metrics=metrics)
    if cors_origins:  # outermost: answers preflights itself and labels every answer, errors included
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    return app


def default_cache_budget() -> int:
    """Half of the memory available now (Linux's MemAvailable; the free pages elsewhere)."""
    return available_memory() // 2


def serve(
    llm: LLM | ModelPool,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = 30.0,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Serve until SIGINT or SIGTERM. On SIGTERM: stop accepting, let running requests finish for up to
    `shutdown_timeout` seconds (then abort them), and return (the process exits 0)."""
    import uvicorn

    app = create_app(llm, loopback_only=is_loopback(host), **options)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    # uvicorn re-raises the signal once it has drained; a drained server is a success, not a kill.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
