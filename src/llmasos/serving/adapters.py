"""LoRA adapters served live, with vLLM's routes: `POST /v1/load_lora_adapter` {"lora_name", "lora_path"} and
`POST /v1/unload_lora_adapter` {"lora_name"}.

A loaded adapter is a model id of its own (`/v1/models` lists it with `parent`, the base); a request's `model`
picks it, and requests for different adapters share the engine's batches (`models.multi_lora`). Loading reads
and checks the dir on a worker thread, then puts the adapter in place on the engine's thread between two steps;
a bad dir is a 400 naming the file and changes nothing. Unloading takes the name away at once (new requests
for it get a 404) and answers when the requests already using it have finished and its weights are gone.

The routes read any dir the server can read, so they are off unless the server was started with
`--allow-runtime-lora` (or LLMASOS_ALLOW_RUNTIME_LORA=1, as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): otherwise
both answer 403 and read nothing. Adapters given at start-up (`--lora`) are served either way. Like every /v1
route, they are behind `--api-key` too when it is set.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.inference import adapters as lora
from llmasos.models.multi_lora import Adapter, AdapterSet, read_adapter_for
from llmasos.serving import schemas as s

MAX_NAME = 256
ALLOW_ENV = "LLMASOS_ALLOW_RUNTIME_LORA"
ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
REFUSED = f"runtime LoRA loading is off; start the server with --allow-runtime-lora (or {ALLOW_ENV}=1)"


def runtime_lora_allowed(allow: bool | None = None) -> bool:
    """Whether the routes may load and unload adapters: `allow` when given, else $LLMASOS_ALLOW_RUNTIME_LORA (1, true or yes)."""
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def add_routes(app: FastAPI, router, allowed: bool) -> None:
    """Add the routes to `app`, over `router` (the app's `Router`, which leases the model a request names: passed
    in, so this module need not import the app). An adapter loads onto `model` (the only one of a one-model
    server by default); unloading finds the model it is on by its name. Not `allowed`: both routes answer 403,
    whatever the body, before any model is leased or any dir read."""
    if not allowed:

        async def refused() -> Response:
            info = s.ErrorInfo(message=REFUSED, type="permission_denied", param=None, code="allow_runtime_lora_required")
            return JSONResponse(s.ErrorResponse(error=info).model_dump(), 403)

        for route in ROUTES:
            app.post(route, include_in_schema=False)(refused)
        return

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: s.LoadLoRAAdapterRequest, request: Request) -> Response:
        async with router.service(body.model, request, reset=False) as service:
            return await load(service, body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: s.UnloadLoRAAdapterRequest, request: Request) -> Response:
        async with router.service(body.lora_name, request, reset=False) as service:
            return await unload(service, body)


async def load(service, body: s.LoadLoRAAdapterRequest) -> Response:
    name = body.lora_name
    if not name.strip() or len(name) > MAX_NAME:
        raise InvalidRequestError(f"lora_name must be a name of 1 to {MAX_NAME} characters", param="lora_name")
    if name == service.model_name or lora.get(service.llm.model, name) is not None:
        raise InvalidRequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    try:
        adapter = await asyncio.to_thread(read_adapter_for, service.projections, name, body.lora_path)
    except LLMasOSError as e:
        raise InvalidRequestError(str(e), param="lora_path") from None

    def put_in_place(engine) -> None:
        lora.collect(engine)
        AdapterSet.of(engine.model).add(adapter)  # a name loaded meanwhile by another request: an error, a 400

    try:
        await service.worker.call(put_in_place)
    except LLMasOSError as e:
        raise InvalidRequestError(str(e), param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload(service, body: s.UnloadLoRAAdapterRequest) -> Response:
    name = body.lora_name

    def retire(engine) -> Adapter | None:
        adapters = AdapterSet.of(engine.model)
        return adapters.retire(name) if adapters.get(name) is not None else None

    adapter = await service.worker.call(retire) if lora.get(service.llm.model, name) is not None else None
    if adapter is None:
        message = f"The lora adapter '{name}' cannot be found."
        info = s.ErrorInfo(message=message, type="not_found_error", param="lora_name", code="model_not_found")
        return JSONResponse(s.ErrorResponse(error=info).model_dump(), 404)
    # The weights go once the requests using them have finished; that goes on if this client leaves.
    await asyncio.shield(asyncio.ensure_future(_drain(service, adapter)))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


async def _drain(service, adapter: Adapter) -> None:
    def still_there(engine) -> bool:
        lora.collect(engine)
        return adapter in AdapterSet.of(engine.model).stacked

    while await service.worker.call(still_there):
        await asyncio.sleep(0.02)
