"""Ollama's API over the same models, so that Ollama's clients (its Python and JavaScript libraries, and the
apps built on them) work against `llmasos serve`: `GET /api/tags`, `POST /api/show`, `POST /api/generate`,
`POST /api/chat` (NDJSON streams, Ollama's field names and `options`), `GET /api/ps`, `GET /api/version`;
and LLMasOS's own `POST /api/stop`, which unloads a model now (Ollama's clients unload one by sending
`keep_alive: 0`, which works here too).

Errors under /api/ have Ollama's shape, `{"error": "message"}` (the app's handlers see to it). What Ollama
does that this server does not (images, tools, `format`, `suffix`) is refused with a 400 saying so, never
silently ignored; options that only tune Ollama's runner (num_ctx, num_thread, ...) are ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import metadata
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmasos.errors import InvalidRequestError
from llmasos.inference import SamplingParams
from llmasos.outputs import read_json
from llmasos.serving import embeddings
from llmasos.serving import schemas as s
from llmasos.serving.engine_thread import EngineFailure, Stream
from llmasos.serving.pool import ModelLoadError, parse_keep_alive

OLLAMA_ROUTES = {"/api/tags", "/api/show", "/api/generate", "/api/chat", "/api/ps", "/api/version", "/api/stop"}
# Ollama's defaults where a request leaves an option out (its repeat_penalty 1.1 over the last 64 tokens is not
# copied: this engine's penalty spans the whole sequence, so it applies only when a request asks for it).
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0}
OPTION_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}


class Options(BaseModel):
    """The `options` this server honours; any other (num_ctx, num_thread, mirostat, ...) is ignored."""

    model_config = ConfigDict(extra="ignore")
    num_predict: int | None = None  # -1 or -2: until the context is full
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class Common(BaseModel):
    model: str
    options: Options | None = None
    stream: bool = True  # Ollama streams unless told not to
    keep_alive: float | str | None = None
    format: Any = None
    think: Any = None


class GenerateRequest(Common):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class Message(BaseModel):
    role: str
    content: str | None = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class ChatRequest(Common):
    messages: Annotated[list[Message], Field(max_length=s.MAX_MESSAGES)] = Field(default_factory=list)
    tools: list[Any] | None = None


class ShowRequest(BaseModel):
    model: str | None = None
    name: str | None = None  # what older clients send
    verbose: bool = False


class StopRequest(BaseModel):
    model: str


class EmbedRequest(BaseModel):
    """Ollama's /api/embed body: what `/v1/embeddings` takes, in Ollama's names."""

    model: str
    input: str | list[str]
    truncate: bool = True  # ours never truncate: an input over the context is a 400 naming it
    dimensions: int | None = None
    keep_alive: float | str | None = None
    options: Options | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return max(0, round((seconds or 0.0) * 1e9))


def tagged(name: str) -> str:
    """Ollama's clients name models name:tag; a store name is served as name:latest (and "name" works too)."""
    return name if ":" in name else f"{name}:latest"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def details(config: Any, path: Any) -> dict[str, Any]:
    if config is None:
        return {"parent_model": "", "format": "", "family": "", "families": None, "parameter_size": "", "quantization_level": ""}
    family = config.architecture.removesuffix("ForCausalLM").lower()
    gguf = path is not None and str(path).endswith(".gguf")
    return {
        "parent_model": "",
        "format": "gguf" if gguf else "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": _count(config.num_parameters()),
        "quantization_level": {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(config.dtype, config.dtype.upper()),
    }


def stored_chat_template(path: Any) -> str:
    """The chat template a model dir ships, read without loading its tokenizer."""
    if path is None or not path.is_dir():
        return ""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = read_json(path / "tokenizer_config.json").get("chat_template") or ""
    except Exception:
        return ""
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    return template if isinstance(template, str) else ""


def sampling(options: Options | None) -> SamplingParams:
    """SamplingParams from Ollama's `options`, with Ollama's defaults; a bad value is a 400 naming the option."""
    o = options or Options()
    stop = [o.stop] if isinstance(o.stop, str) else o.stop
    try:
        return SamplingParams(
            max_tokens=o.num_predict if o.num_predict is not None and o.num_predict > 0 else None,
            temperature=DEFAULTS["temperature"] if o.temperature is None else o.temperature,
            top_k=DEFAULTS["top_k"] if o.top_k is None else o.top_k,
            top_p=DEFAULTS["top_p"] if o.top_p is None else o.top_p,
            min_p=DEFAULTS["min_p"] if o.min_p is None else o.min_p,
            seed=o.seed if o.seed is not None and o.seed >= 0 else None,
            stop=stop or None,
            repetition_penalty=1.0 if o.repeat_penalty is None else o.repeat_penalty,
            presence_penalty=o.presence_penalty or 0.0,
            frequency_penalty=o.frequency_penalty or 0.0,
        )
    except InvalidRequestError as e:
        e.param = f"options.{OPTION_NAMES.get(e.param or '', e.param)}"
        raise


def _refuse(body: Common, images: bool, extra: dict[str, Any]) -> None:
    if body.format not in (None, ""):
        raise InvalidRequestError("format (structured outputs) is not supported by this server", param="format")
    if images:
        raise InvalidRequestError(f"{body.model} does not support images", param="images")
    for field, value in extra.items():
        if value:
            raise InvalidRequestError(f"{body.model} does not support {field}", param=field)


def add_ollama_routes(app: FastAPI, router: Any) -> None:
    """Ollama's routes on `app`, over `router` (the app's Router: its pool, and the lease of a model's
    Service for a request)."""
    pool = router.pool

    def final(name: str, out: Any, started: float, load_seconds: float) -> dict[str, Any]:
        first, end = out.first_token_at, out.finished_at
        return {
            "model": name,
            "created_at": _now(),
            "done": True,
            "done_reason": out.finish_reason or "stop",
            "total_duration": _ns(time.perf_counter() - started),
            "load_duration": _ns(load_seconds),
            "prompt_eval_count": len(out.prompt_token_ids),
            "prompt_eval_duration": _ns(first - out.arrival if first is not None else None),
            "eval_count": out.num_generated,
            "eval_duration": _ns(end - first if first is not None and end is not None else None),
        }

    def loaded_only(name: str, keep_alive: float | str | None, started: float, load_seconds: float, chat: bool) -> JSONResponse:
        """The answer to a request without a prompt: Ollama's way to load a model (or, keep_alive 0, unload it)."""
        unload = keep_alive is not None and parse_keep_alive(keep_alive) == 0
        answer: dict[str, Any] = {"model": name, "created_at": _now()}
        answer.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        answer.update(
            done=True,
            done_reason="unload" if unload else "load",
            total_duration=_ns(time.perf_counter() - started),
            load_duration=_ns(load_seconds),
        )
        return JSONResponse(answer)

    async def answer(
        service: Any, name: str, stream: Stream, body: Common, request: Request, started: float, load_seconds: float, chat: bool
    ) -> Response:
        def piece(text: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

        if not body.stream:
            if not await service.run_to_end(stream, request):
                return Response(status_code=499)
            out = stream.outputs[0]
            result = {"model": name, "created_at": _now(), **piece(out.text)}
            result.update({k: v for k, v in final(name, out, started, load_seconds).items() if k not in result})
            if not chat:
                result["context"] = out.prompt_token_ids + out.token_ids
            return JSONResponse(result)

        async def lines() -> AsyncIterator[str]:
            try:
                async for d in stream:
                    if d.text:
                        yield json.dumps({"model": name, "created_at": _now(), **piece(d.text), "done": False}) + "\n"
                out = stream.outputs[0]
                last = {"model": name, "created_at": _now(), **piece(""), **final(name, out, started, load_seconds)}
                if not chat:
                    last["context"] = out.prompt_token_ids + out.token_ids
                yield json.dumps(last) + "\n"
            except EngineFailure:
                yield json.dumps({"error": router.unexpected("an Ollama stream")}) + "\n"
            finally:  # also when the client disconnects: this is what frees its rows at once
                stream.cancel()
                service.metrics.record(stream.outputs)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def generate(body: GenerateRequest, request: Request) -> Response:
        started = time.perf_counter()
        _refuse(body, bool(body.images), {"suffix": body.suffix})
        empty = not body.prompt and not body.context
        if empty and body.keep_alive is not None and parse_keep_alive(body.keep_alive) == 0:
            await pool.stop(body.model)  # Ollama's unload: nothing is loaded for it
            return loaded_only(body.model, body.keep_alive, started, 0.0, chat=False)
        async with router.service(body.model, request, body.keep_alive) as service:
            load_seconds = time.perf_counter() - started
            if empty:
                return loaded_only(body.model, body.keep_alive, started, load_seconds, chat=False)
            prompt = body.prompt or ""
            if body.raw or not service.tokenizer.chat_template:
                text = f"{body.system}\n\n{prompt}" if body.system and not body.raw else prompt
                ids = (await service.encode([text], "prompt", not body.context))[0] if text else []
            else:
                turns = [s.ChatMessage(role="system", content=body.system)] if body.system else []
                ids = await service.chat_prompt([*turns, s.ChatMessage(role="user", content=prompt)])
            stream = await service.worker.submit([list(body.context or []) + ids], sampling(body.options))
            return await answer(service, body.model, stream, body, request, started, load_seconds, chat=False)

    async def chat(body: ChatRequest, request: Request) -> Response:
        started = time.perf_counter()
        _refuse(body, any(m.images for m in body.messages), {"tools": body.tools})
        if not body.messages and body.keep_alive is not None and parse_keep_alive(body.keep_alive) == 0:
            await pool.stop(body.model)
            return loaded_only(body.model, body.keep_alive, started, 0.0, chat=True)
        async with router.service(body.model, request, body.keep_alive) as service:
            load_seconds = time.perf_counter() - started
            if not body.messages:
                return loaded_only(body.model, body.keep_alive, started, load_seconds, chat=True)
            prompt = await service.chat_prompt([s.ChatMessage(role=m.role, content=m.content or "") for m in body.messages])
            stream = await service.worker.submit([prompt], sampling(body.options))
            return await answer(service, body.model, stream, body, request, started, load_seconds, chat=True)

    async def embed(body: EmbedRequest, request: Request) -> Response:
        """Ollama's embeddings: the same vectors as `/v1/embeddings` (pooled, L2-normalised), as `embeddings`."""
        started = time.perf_counter()
        async with router.service(body.model, request, body.keep_alive) as service:
            load_seconds = time.perf_counter() - started
            inner = s.EmbeddingRequest(model=body.model, input=body.input, dimensions=body.dimensions)
            answer = await embeddings.create(service, inner, request)
        if answer.status_code != 200:
            return answer
        result = json.loads(bytes(answer.body))
        return JSONResponse(
            {
                "model": body.model,
                "embeddings": [d["embedding"] for d in result["data"]],
                "total_duration": _ns(time.perf_counter() - started),
                "load_duration": _ns(load_seconds),
                "prompt_eval_count": result["usage"]["prompt_tokens"],
            }
        )

    async def tags() -> dict[str, Any]:
        models = []
        for name in pool.names():
            path = pool.path(name)
            info = pool.catalog.describe(name, path)
            models.append(
                {
                    "name": tagged(name),
                    "model": tagged(name),
                    "modified_at": _iso(info["modified"]),
                    "size": info["size"],
                    "digest": info["digest"],
                    "details": details(info["config"], path),
                }
            )
        return {"models": models}

    async def show(body: ShowRequest) -> dict[str, Any]:
        name = pool.resolve(body.model or body.name or None)
        path = pool.path(name)
        info = pool.catalog.describe(name, path)
        entry = pool.loaded.get(name)
        config = info["config"] if entry is None or entry.llm is None else entry.llm.config
        if config is None:
            raise ModelLoadError(f"could not read the model `{name}`: {info['error']}")
        family = details(config, path)["family"]
        template = entry.llm.tokenizer.chat_template if entry is not None and entry.llm is not None else None
        return {
            "modelfile": f"# served by LLMasOS\nFROM {path}\n",
            "parameters": "",
            "template": template or stored_chat_template(path),
            "details": details(config, path),
            "model_info": {
                "general.architecture": family,
                "general.parameter_count": config.num_parameters(),
                f"{family}.context_length": config.max_position_embeddings,
                f"{family}.embedding_length": config.hidden_size,
                f"{family}.feed_forward_length": config.intermediate_size,
                f"{family}.block_count": config.num_hidden_layers,
                f"{family}.attention.head_count": config.num_attention_heads,
                f"{family}.attention.head_count_kv": config.num_key_value_heads,
                f"{family}.rope.freq_base": config.rope_theta,
                f"{family}.vocab_size": config.vocab_size,
            },
            "capabilities": ["completion"],
            "modified_at": _iso(info["modified"]),
        }

    async def ps() -> dict[str, Any]:
        """Ollama's fields (name, model, size, size_vram, digest, details, expires_at, context_length) and
        LLMasOS's (weights and KV cache sizes, running and waiting sequences, keep-alive, load time)."""
        rows = []
        for row in pool.ps():
            path = pool.path(row["name"])
            info = pool.catalog.describe(row["name"], path)
            rows.append(
                {
                    **row,
                    "name": tagged(row["name"]),
                    "model": tagged(row["name"]),
                    "digest": info["digest"],
                    "details": details(info["config"], path),
                }
            )
        return {"models": rows, **pool.budget_info()}

    async def version() -> dict[str, str]:
        try:
            return {"version": metadata.version("llmasos")}
        except metadata.PackageNotFoundError:
            return {"version": "0.0.0"}

    async def stop(body: StopRequest) -> dict[str, Any]:
        """Unload a model now (once its requests have ended); `unloaded` is false if it was not loaded."""
        return {"model": body.model, "unloaded": await pool.stop(body.model)}

    app.get("/api/tags")(tags)
    app.post("/api/show")(show)
    app.post("/api/generate")(generate)
    app.post("/api/chat")(chat)
    app.get("/api/ps")(ps)
    app.get("/api/version")(version)
    app.post("/api/stop")(stop)
    app.post("/api/embed")(embed)
