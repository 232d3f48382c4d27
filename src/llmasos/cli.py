"""`llmasos`: the command line. Thin: parses arguments and calls the packages; torch is imported
only by the verbs that need it, so `llmasos --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from llmasos.errors import LLMasOSError
from llmasos.extras import require
from llmasos.training.config import FinetuneConfig, TrainConfig  # no torch: --help stays instant

VERBS: dict[str, tuple[str, str]] = {}  # name -> (one-line help, examples)


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ---- verbs ---------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmasos.checkpoints.hf import load_config
    from llmasos.checkpoints.store import dir_size, models_dir, stored_models
    from llmasos.models.zoo import ZOO, zoo_config

    console = Console()
    zoo = Table(title="Model zoo (shapes)", title_justify="left")
    for col in ("name", "params", "layers", "hidden", "heads/kv", "context", "Hugging Face id"):
        zoo.add_column(col, justify="right" if col in ("params", "layers", "hidden", "context") else "left")
    for name in ZOO:
        c = zoo_config(name)
        zoo.add_row(
            name,
            _human_count(c.num_parameters()),
            str(c.num_hidden_layers),
            str(c.hidden_size),
            f"{c.num_attention_heads}/{c.num_key_value_heads}",
            str(c.max_position_embeddings),
            ZOO[name].get("hf_id", "-"),
        )
    console.print(zoo)
    stored = Table(title=f"Stored models ({models_dir()})", title_justify="left")
    for col in ("name", "architecture", "params", "dtype", "size"):
        stored.add_column(col)
    for path in stored_models():
        try:
            c = load_config(path)
            stored.add_row(path.name, c.architecture, _human_count(c.num_parameters()), c.dtype, _human_bytes(dir_size(path)))
        except LLMasOSError as e:
            stored.add_row(path.name, f"[red]unreadable: {e}[/red]", "", "", "")
    if stored.row_count:
        console.print(stored)
    else:
        console.print(f"No stored models in {models_dir()} yet: `llmasos pull SOURCE` imports one.")


def cmd_pull(args: argparse.Namespace) -> None:
    from llmasos.checkpoints.store import pull

    path = pull(args.source, name=args.name, force=args.force)
    print(f"stored {args.source} as {path.name!r} in {path}")


def _system_info() -> None:
    from llmasos.kernels import system_report

    rows = system_report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_info(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from llmasos.checkpoints.store import dir_size, resolve
    from llmasos.models.zoo import ZOO, zoo_config

    if args.system:
        _system_info()
        if args.model is None:
            return
    elif args.model is None:
        raise LLMasOSError("name a model (a store name, a model dir or a zoo shape), or give --system")
    rows: list[tuple[str, str]] = []
    if args.model in ZOO and not Path(args.model).exists():
        config, path = zoo_config(args.model), None
        rows.append(("source", f"zoo shape (Hugging Face id {ZOO[args.model].get('hf_id', '-')})"))
    else:
        from llmasos.checkpoints.load import open_checkpoint

        path = resolve(args.model)
        config, _ = open_checkpoint(path)
        rows.append(("path", str(path)))
    rows += [
        ("architecture", config.architecture),
        ("parameters", f"{config.num_parameters():,} ({_human_count(config.num_parameters())})"),
        ("layers", str(config.num_hidden_layers)),
        ("hidden size", str(config.hidden_size)),
        ("FFN size", str(config.intermediate_size)),
        ("heads / KV heads / head dim", f"{config.num_attention_heads} / {config.num_key_value_heads} / {config.head_dim}"),
        ("vocabulary", str(config.vocab_size)),
        ("context", str(config.max_position_embeddings)),
        (
            "rope",
            f"theta {config.rope_theta:g}, {config.rope_type}"
            + (f" x{config.rope_scaling['factor']:g}" if config.rope_scaling else ""),
        ),
        ("tied embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("dtype", config.dtype),
    ]
    if path is not None:
        rows.append(("size on disk", _human_bytes(dir_size(path) if path.is_dir() else path.stat().st_size)))
        from llmasos.checkpoints.gguf_vocab import tokenizer_source
        from llmasos.tokenization import Tokenizer

        try:
            tok = Tokenizer(tokenizer_source(path))
            rows.append(("tokenizer", f"{tok.kind}, {tok.vocab_size} tokens, BOS {tok.bos_token!r}, EOS {tok.eos_token!r}"))
            rows.append(("chat template", "yes" if tok.has_chat_template else "no (built-in Llama format used)"))
        except LLMasOSError as e:
            rows.append(("tokenizer", f"none ({e})"))
    table = Table(show_header=False, title=args.model, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _load_llm(args: argparse.Namespace, max_batch_size: int = 16, **options):
    from llmasos import LLM

    return LLM.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        compile=args.compile,
        max_batch_size=max_batch_size,
        progress=True,
        **options,
    )


SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def _size(text: str) -> int:
    """A memory size: bytes, or a number with a unit (512MiB, 4GiB, 2G)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 512MiB, 4GiB, 2G)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def _batched_tokens(text: str) -> int | str:
    """--max-num-batched-tokens: "auto" or a number of tokens (0: whole prompts)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number of tokens")
    return value


def _sampling(args: argparse.Namespace, **overrides):
    from llmasos import SamplingParams

    values = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or None,
    )
    return SamplingParams(**{**values, **overrides})


def cmd_generate(args: argparse.Namespace) -> None:
    import json
    import time

    llm = _load_llm(args)
    params = _sampling(args)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    t0 = time.perf_counter()
    if args.json:
        out = llm.generate([prompt], params)[0]
        seconds = out.finished_at - out.arrival
        decode = out.finished_at - out.first_token_at
        print(
            json.dumps(
                {
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason,
                    "prompt_tokens": len(out.prompt_token_ids),
                    "generated_tokens": len(out.token_ids),
                    "time_to_first_token_s": round(out.first_token_at - out.arrival, 4),
                    "total_s": round(seconds, 4),
                    "decode_tokens_per_s": round((len(out.token_ids) - 1) / decode, 2) if decode > 0 else None,
                },
                ensure_ascii=False,
            )
        )
        return
    output = llm.engine.add(prompt, params)
    stream = sys.stdout.isatty()
    while not output.finished:
        for delta in llm.engine.step():
            if stream and delta.text:
                print(delta.text, end="", flush=True)
    if not stream:
        print(output.text, end="")
    print()
    n = len(output.token_ids)
    print(f"[{n} tokens, {n / (time.perf_counter() - t0):.1f} tok/s, finish: {output.finish_reason}]", file=sys.stderr)


def _read_tools(path: str) -> list:
    """A tools file: OpenAI's list of tools ([{"type": "function", "function": {...}}, ...]) or {"tools": [...]}."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except OSError as e:
        raise LLMasOSError(f"--tools {path}: cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise LLMasOSError(f"--tools {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return tools.get("tools") if isinstance(tools, dict) else tools


def cmd_chat(args: argparse.Namespace) -> None:

    from llmasos.errors import InvalidRequestError
    from llmasos.inference.tools import plan_tools

    llm = _load_llm(args)
    tools = _read_tools(args.tools) if args.tools else None
    choice = args.tool_choice
    if choice not in (None, "auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    try:  # the first answer to each message follows --tool-choice; the answers after tool results are "auto"
        first = plan_tools(llm.tokenizer, tools, choice) if tools else None
        later = plan_tools(llm.tokenizer, tools, "auto") if tools and choice != "none" else None
    except InvalidRequestError as e:
        raise LLMasOSError(f"--tools {args.tools}: {e}" if e.param != "tool_choice" else f"--tool-choice: {e}") from None
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chatting with {args.model}. /reset clears the conversation, /exit quits, Ctrl-C stops an answer.", file=sys.stderr)
    if first is not None:
        names = ", ".join(t["function"]["name"] for t in tools)
        print(f"Tools: {names}. When the model calls one, type what it returns.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit", "/bye"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        plan = first
        while True:  # an answer; after tool calls, the results and the next answer
            calls = _chat_turn(llm, args, messages, plan)
            if not calls:
                break
            try:
                for call in calls:
                    result = input(f"{call.name} returns> ")
                    messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
            plan = later


def _chat_turn(llm, args: argparse.Namespace, messages: list[dict], plan) -> list:
    """Stream one answer and add it to `messages`; returns the tool calls it made."""
    import time

    prompt = llm.chat_prompt(messages, plan.tools if plan else None)
    context = llm.engine.max_seq_len - len(prompt)
    if context < 1:
        print("(the conversation no longer fits the context: /reset to start again)", file=sys.stderr)
        messages.pop()
        return []
    params = _sampling(args, max_tokens=min(args.max_tokens, context), structured=plan.structured if plan else None)
    output = llm.engine.add(prompt, params)
    reader = plan.reader(llm.tokenizer) if plan else None
    t0 = time.perf_counter()
    try:
        while not output.finished:
            for delta in llm.engine.step():
                if reader is None:
                    print(delta.text, end="", flush=True)
                    continue
                for event in reader.feed(delta.token_ids, delta.finished):
                    if event.kind == "content":
                        print(event.text, end="", flush=True)
                    elif event.kind == "call":
                        print(f"\n-> {event.name}(", end="", flush=True)
                    else:
                        print(event.text, end="", flush=True)
        if reader is not None and reader.calls:
            print(")", end="")
    except KeyboardInterrupt:
        llm.engine.abort(output.request_id)
        print(" [stopped]", end="")
    print()
    cut = output.finish_reason in ("abort", "length")
    if reader is not None and reader.calls and cut:
        print("(the call was cut short: raise --max-tokens)", file=sys.stderr)
    calls = reader.calls if reader is not None and not cut else []
    if calls:
        messages.append({"role": "assistant", "content": reader.content or None, "tool_calls": [c.to_dict() for c in calls]})
    else:
        messages.append({"role": "assistant", "content": reader.content if reader is not None else output.text})
    n = len(output.token_ids)
    ttft = (output.first_token_at or t0) - output.arrival
    decode = time.perf_counter() - (output.first_token_at or t0)
    rate = (n - 1) / decode if n > 1 and decode > 0 else 0.0
    print(f"[{n} tokens, {rate:.1f} tok/s, first token after {ttft:.2f} s, {len(prompt)} prompt tokens]", file=sys.stderr)
    return calls


def cmd_serve(args: argparse.Namespace) -> None:
    require("serve", "llmasos serve")
    from llmasos.serving import serve
    from llmasos.serving.adapters import runtime_lora_allowed
    from llmasos.serving.app import default_cache_budget

    if args.max_running < 1 or args.max_queue < 0:
        raise LLMasOSError("--max-running must be at least 1 and --max-queue at least 0")
    if args.max_num_batched_tokens not in ("auto", 0) and args.max_num_batched_tokens < args.max_running:
        raise LLMasOSError(
            f"--max-num-batched-tokens {args.max_num_batched_tokens} is less than --max-running {args.max_running}: "
            "every running sequence's next token counts against it each step (0: whole prompts)"
        )
    api_key = args.api_key or os.environ.get("LLMASOS_API_KEY") or None
    common = dict(
        host=args.host,
        port=args.port,
        shutdown_timeout=args.shutdown_timeout,
        api_key=api_key,
        cors_origins=args.cors_origin,
        allow_runtime_lora=args.allow_runtime_lora or None,  # None: as $LLMASOS_ALLOW_RUNTIME_LORA says
    )
    if runtime_lora_allowed(common["allow_runtime_lora"]):
        print(
            "runtime LoRA loading is on: POST /v1/load_lora_adapter loads any adapter dir this server can read"
            + ("" if api_key else " (and no --api-key is set)"),
            file=sys.stderr,
        )
    if args.model is None:
        return _serve_store(args, common)
    if args.models:
        raise LLMasOSError("give MODEL or --models, not both: MODEL serves that one model, --models a part of the store")
    budget = args.kv_cache_memory or default_cache_budget()
    llm = _load_llm(
        args,
        max_batch_size=args.max_running,
        max_seq_len=args.max_model_len,
        cache_budget=budget,
        enable_prefix_caching=not args.no_prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens or None,
        pooling=args.pooling,
    )
    for name, path in args.lora or []:
        llm.load_adapter(name, path)
        print(f"LoRA adapter {name!r} ({path}) loaded", file=sys.stderr)
    source = "--kv-cache-memory" if args.kv_cache_memory else "half of the memory available at start-up"
    print(
        f"KV cache budget {budget / 2**30:.2f} GiB ({source}): sequences of up to {llm.engine.max_seq_len} tokens, "
        f"{llm.engine.fit_len(args.max_running)} each when all {args.max_running} rows run",
        file=sys.stderr,
    )
    print(f"serving {args.model} at http://{args.host}:{args.port} (web chat at /, API at /v1)", file=sys.stderr)
    serve(llm, served_model_name=args.served_model_name or args.model, max_queue=args.max_queue, **common)


def _serve_store(args: argparse.Namespace, common: dict) -> None:
    """`llmasos serve` without MODEL: every stored model (or --models), each loaded on its first request."""
    from llmasos.checkpoints.store import models_dir, stored_models
    from llmasos.errors import InvalidRequestError
    from llmasos.serving import serve
    from llmasos.serving.pool import (
        Catalog,
        LoadOptions,
        ModelPool,
        default_memory_budget,
        format_duration,
        human_bytes,
        parse_keep_alive,
    )

    if args.served_model_name:
        raise LLMasOSError("--served-model-name names the one MODEL served: give MODEL, or leave the store's names")
    stored = [p.name for p in stored_models()]
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
    if names is not None:
        unknown = [n for n in names if n not in stored]
        if unknown:
            raise LLMasOSError(
                f"not in the store {models_dir()}: {', '.join(unknown)} (stored: {', '.join(stored) or 'none yet'})"
            )
    elif not stored:
        raise LLMasOSError(f"no models in the store {models_dir()} yet: `llmasos pull SOURCE` imports one")
    try:
        keep_alive = parse_keep_alive(args.keep_alive, "--keep-alive")
    except InvalidRequestError as e:
        raise LLMasOSError(str(e)) from None
    budget = args.memory_budget or default_memory_budget(args.device)
    options = LoadOptions(
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        compile=args.compile,
        max_running=args.max_running,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        prefix_caching=not args.no_prefix_caching,
        max_num_batched_tokens=args.max_num_batched_tokens or None,
    )
    pool = ModelPool(Catalog(names=names), options, memory_budget=budget, keep_alive=keep_alive)
    served = names or stored
    source = "--memory-budget" if args.memory_budget else "of the memory available at start-up"
    print(
        f"serving {len(served)} model{'s' * (len(served) != 1)} ({', '.join(served)}{'' if names else ', and any pulled later'}) "
        f"at http://{args.host}:{args.port}, each loaded on its first request; keep-alive "
        f"{format_duration(keep_alive)}; memory budget {human_bytes(budget)} ({source}) for weights and KV caches",
        file=sys.stderr,
    )
    serve(pool, **common)


def _server_url(args: argparse.Namespace) -> str:
    """The server `ps` and `stop` talk to: --host/--port, else $LLMASOS_HOST (host:port or a URL)."""
    if args.host is None and args.port is None and os.environ.get("LLMASOS_HOST"):
        target = os.environ["LLMASOS_HOST"]
        return target.rstrip("/") if "://" in target else f"http://{target}"
    return f"http://{args.host or '127.0.0.1'}:{args.port or 8000}"


def _call_server(args: argparse.Namespace, method: str, route: str, body: dict | None = None) -> dict:
    import json
    import urllib.error
    import urllib.request

    url = _server_url(args) + route
    headers = {"Content-Type": "application/json"}
    key = args.api_key or os.environ.get("LLMASOS_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise LLMasOSError(f"{url}: {e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise LLMasOSError(f"no server at {_server_url(args)} ({reason}): start one with `llmasos serve`") from None


def cmd_ps(args: argparse.Namespace) -> None:
    import json
    import time

    from rich.console import Console
    from rich.table import Table

    answer = _call_server(args, "GET", "/api/ps")
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    table = Table(title=f"Loaded models ({_server_url(args)})", title_justify="left")
    for col in ("name", "size", "weights", "KV cache (used / reserved)", "running", "waiting", "context", "unloads"):
        table.add_column(col, justify="left" if col in ("name", "unloads") else "right")
    for m in answer["models"]:
        if m.get("expires_in") is None:
            until = "never"
        elif m.get("running") or m.get("waiting"):
            until = f"{_duration(m['expires_in'])} after its requests"
        else:
            at = time.strftime("%H:%M:%S", time.localtime(time.time() + m["expires_in"]))
            until = f"in {_duration(m['expires_in'])} ({at})"
        table.add_row(
            m["model"],
            _human_bytes(m["size"]),
            _human_bytes(m.get("weights_size", 0)),
            f"{_human_bytes(m.get('kv_cache_used', 0))} / {_human_bytes(m.get('kv_cache_size', 0))}",
            str(m.get("running", 0)),
            str(m.get("waiting", 0)),
            str(m.get("context_length", "")),
            until,
        )
    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: no wrapped names
    if table.row_count:
        console.print(table)
    else:
        print("no model is loaded")
    if answer.get("memory_budget"):
        print(f"memory: {_human_bytes(answer['memory_used'])} of a {_human_bytes(answer['memory_budget'])} budget in use")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds % 60 else f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def cmd_stop(args: argparse.Namespace) -> None:
    answer = _call_server(args, "POST", "/api/stop", {"model": args.model})
    print(f"unloaded {args.model}" if answer["unloaded"] else f"{args.model} was not loaded", file=sys.stderr)


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="the server's address (default 127.0.0.1, or $LLMASOS_HOST as host:port or a URL)")
    p.add_argument("--port", type=int, help="the server's port (default 8000)")
    p.add_argument("--api-key", help="the server's API key (default $LLMASOS_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default 600)")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from llmasos.data.sources import SourceStats, iter_documents
    from llmasos.tokenization import Tokenizer
    from llmasos.tokenization.train import train_bpe

    stats = SourceStats()
    docs = (
        d.text
        for d in iter_documents(args.inputs, glob=args.glob, text_field=args.text_field, on_error=args.on_error, stats=stats)
    )
    out = train_bpe(docs, args.vocab_size, args.out, min_frequency=args.min_frequency, inputs=args.inputs, force=args.force)
    tok = Tokenizer(out)
    skipped = f", {stats.skipped} records skipped" if stats.skipped else ""
    print(
        f"trained a byte-level BPE of {tok.vocab_size} tokens on {stats.documents} documents from "
        f"{stats.files} files{skipped}; wrote {out / 'tokenizer.json'} and {out / 'tokenizer_config.json'}"
    )
    for error in stats.errors:
        print(f"  skipped {error}", file=sys.stderr)


def cmd_prepare(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmasos.data.prepare import prepare

    meta, stats, sources = prepare(
        args.inputs,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        workers=args.workers,
        glob=args.glob,
        text_field=args.text_field,
        on_error=args.on_error,
        force=args.force,
    )
    table = Table(title=f"Prepared {args.out}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in [
        ("files read", sources.files),
        ("documents read", stats.documents_read),
        ("skipped (malformed)", stats.skipped),
        ("empty after cleaning", stats.empty),
        ("exact duplicates removed", stats.duplicates),
        ("train documents / tokens", f"{stats.documents['train']:,} / {stats.tokens['train']:,}"),
        ("val documents / tokens", f"{stats.documents['val']:,} / {stats.tokens['val']:,}"),
        ("token dtype", meta["dtype"]),
        ("vocabulary", f"{meta['vocab_size']:,}"),
    ]:
        table.add_row(label, str(value))
    Console().print(table)
    for error in sources.errors:
        print(f"  skipped {error}", file=sys.stderr)


def _training_config(cls: type[TrainConfig], args: argparse.Namespace) -> TrainConfig:
    """A training verb's config: the run's saved config (--resume) or a YAML file (--config), under the flags
    given; or the flags alone over the config's defaults."""
    keys = cls.keys()
    overrides = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    if args.resume:
        return cls.from_run(args.resume, overrides)
    if args.config:
        return cls.from_yaml(args.config, overrides)
    return cls.from_dict(overrides, where="flags")


def cmd_pretrain(args: argparse.Namespace) -> None:
    require("train", "llmasos pretrain")
    from llmasos.training.trainer import pretrain

    run = pretrain(_training_config(TrainConfig, args), resume=bool(args.resume), force=args.force, inputs=[args.config])
    print(
        f"trained {run.steps} steps; the model is in {run.dir / 'final'}; metrics in {run.dir / 'metrics.csv'}, "
        f"loss curve in {run.dir / 'loss.png'}"
    )
    print(f"next: llmasos generate {run.dir / 'final'} -p 'Hello'")


def cmd_finetune(args: argparse.Namespace) -> None:
    require("train", "llmasos finetune")
    from llmasos.training.finetune import finetune

    if not args.resume and not args.model:
        raise LLMasOSError("finetune: name the model to start from (llmasos finetune MODEL --data FILE ...)")
    run = finetune(_training_config(FinetuneConfig, args), resume=bool(args.resume), force=args.force, inputs=[args.config])
    out = run.dir
    print(f"fine-tuned {run.steps} steps; metrics in {out / 'metrics.csv'}, loss curve in {out / 'loss.png'}")
    for name, what in (("adapter", "the LoRA adapter (PEFT format)"), ("final", "the fine-tuned model (HF dir)")):
        if (out / name).exists():
            print(f"  {what}: {out / name}")
    print(f"next: llmasos chat {out / ('final' if (out / 'final').exists() else 'adapter')}")


def cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rich.console import Console

    from llmasos.evaluation.results import EvalConfig, check_results_path, compare_table, results_table, write_results

    if args.model == "compare":
        Console().print(compare_table(args.results))
        return
    require("eval", "llmasos eval")
    from llmasos.evaluation.runner import evaluate, plan  # imports torch: not for `compare`

    if args.results:
        raise LLMasOSError(f"unexpected arguments {' '.join(args.results)} (only `llmasos eval compare` takes files)")
    config = EvalConfig(
        tasks=[t for t in (args.tasks or "").split(",") if t],
        limit=args.limit,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        perplexity=args.perplexity,
        stride=args.stride,
    )
    if args.out:
        inputs = [args.model, args.perplexity, args.include_path, *config.tasks]
        check_results_path(Path(args.out), inputs, args.force)  # before the model is loaded
    work = plan(config)  # a bad task or path is reported before the model is loaded
    llm = _load_llm(args, max_batch_size=args.batch_size)
    rows = evaluate(llm, config, args.model, work)
    Console().print(results_table(rows))
    if args.out:
        print(f"wrote {write_results(rows, args.out, args.model)}")


def cmd_tasks(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmasos.evaluation import builtin_tasks, load_task

    table = Table(title="Built-in evaluation tasks (llmasos eval MODEL --tasks NAME)", title_justify="left")
    for col in ("name", "kind", "samples", "metrics", "description"):
        table.add_column(col, justify="right" if col == "samples" else "left", no_wrap=col in ("name", "kind"))
    for name in builtin_tasks():
        task = load_task(name)
        table.add_row(name, task.kind, str(len(task.records)), ", ".join(task.metrics), task.description)
    Console().print(table)


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from llmasos.checkpoints.store import resolve

    path, out = resolve(args.model), Path(args.out)
    if args.format == "gguf":
        from llmasos.checkpoints.export import export_gguf

        written = export_gguf(path, out, args.dtype, force=args.force)
        print(f"wrote {written} ({_human_bytes(written.stat().st_size)}) and {written.parent / 'Modelfile'}")
        print(
            f"next: llama.cpp loads the .gguf as it is; for Ollama: cd {written.parent} && "
            f"ollama create {path.name.removesuffix('.gguf')} -f Modelfile"
        )
    elif args.format == "hf":
        from llmasos.checkpoints.export import export_hf

        print(f"wrote {export_hf(path, out, args.dtype, force=args.force)}")
    else:
        require("export", "llmasos export --format onnx")
        from llmasos.checkpoints.onnx import export_onnx

        dtypes = {"auto": "float32", "f32": "float32", "f16": "float16"}
        if args.dtype not in dtypes:
            raise LLMasOSError(f"--dtype {args.dtype}: an ONNX export is f32 (the default) or f16")
        print(f"wrote {export_onnx(path, out, dtype=dtypes[args.dtype], force=args.force)}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    require("train", "llmasos quickstart")
    require("eval", "llmasos quickstart")
    from llmasos.quickstart import run

    run(minutes=args.minutes, out=args.out, corpus_mb=args.corpus_mb, force=args.force)


# ---- parser ----------------------------------------------------------------------------------------


def _verb(sub, name: str, func: Callable, help: str, examples: str) -> argparse.ArgumentParser:
    VERBS[name] = (help, examples)
    p = sub.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.set_defaults(func=func)
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a store name or a model dir")
    p.add_argument("--dtype", default="auto", help="auto (as stored; fp16 becomes bf16 on CPU), float32, bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of the linear layers")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")


def _sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely (default off)")
    p.add_argument("--seed", type=int, help="same seed, same output")
    p.add_argument("--stop", action="append", help="stop at this string (repeatable)")


def _force_option(
    p: argparse.ArgumentParser,
    does: str = "replace what is at --out",
    ours: str = "it is an empty dir or this same command wrote it (a dir it writes carries a .llmasos marker)",
) -> None:
    """--force, with the rule it overrides: nothing the user owns is replaced without it, and no input ever."""
    p.add_argument(
        "--force",
        action="store_true",
        help=f"{does}, even if LLMasOS did not write it. Without --force an existing --out is used only "
        f"if {ours}. An --out that is or contains an input is refused even with "
        f"--force",
    )


def _train_options(p: argparse.ArgumentParser, command: str, config: type[TrainConfig], skip: tuple[str, ...] = ()) -> None:
    """--config, --resume, --force, and every key of the `config` dataclass as a flag (`--max-steps 100`), its
    description and default for help; a yes/no key also works bare (`--merge`). The flags default to None, so
    that only those given override the YAML."""
    p.add_argument("--config", help="a YAML file of the keys below (flags override it)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (from step 0, with its saved config, if it has none yet)",
    )
    _force_option(
        p,
        "delete what is at --out and start a new run there",
        f"it is an empty dir, or `llmasos {command}` wrote it (its .llmasos marker) and it holds no checkpoints yet",
    )
    descriptions = config.descriptions()
    for key, hint in config.keys().items():
        if key in skip:
            continue
        extra = {"nargs": "?", "const": "true"} if hint is bool else {}
        p.add_argument(
            f"--{key.replace('_', '-')}",
            dest=key,
            metavar=_metavar(config, key, hint),
            help=descriptions[key].replace("%", "%%"),
            **extra,
        )


def _metavar(config: type[TrainConfig], key: str, hint) -> str:
    if key in config.CHOICES:
        return "|".join(config.CHOICES[key])
    kinds = {bool: "true|false", int: "N", float: "X", int | None: "N", float | None: "X"}
    return kinds.get(hint, key.upper())


def _corpus_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--glob", default="*", help="which files to take from directories (default: all)")
    p.add_argument("--text-field", default="text", help="the field (JSONL) or column (Parquet) with the text")
    p.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="a malformed record stops the run (fail) or is skipped and counted (skip)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmasos",
        description="LLMasOS: the whole life of a LLaMA-family model. MODEL is a store name or a model dir path.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    _verb(sub, "models", cmd_models, "list the zoo (named shapes) and the models in the local store", "  llmasos models")

    p = _verb(
        sub,
        "pull",
        cmd_pull,
        "import a model into the store (HF dir, Meta dir, GGUF file, zoo name or hub id)",
        "  llmasos pull ./my-hf-model --name my-model\n"
        "  llmasos pull ./llama-2-7b            # Meta params.json + consolidated.*.pth\n"
        "  llmasos pull ./Llama-3.2-1B-Instruct-Q4_K_M.gguf   # llama.cpp / Ollama download\n"
        "  llmasos pull TinyLlama/TinyLlama-1.1B-Chat-v1.0   # needs network access",
    )
    p.add_argument("source", help="a local HF dir, a Meta checkpoint dir, a .gguf file, a zoo name or a hub id (owner/name)")
    p.add_argument("--name", help="store name (default: from the source)")
    p.add_argument("--force", action="store_true", help="replace a stored model of the same name")

    p = _verb(
        sub,
        "info",
        cmd_info,
        "architecture, shape, parameters, dtype, size and tokenizer of a model; or this machine's CPU and kernels",
        "  llmasos info my-model\n  llmasos info ./path/to/model-dir\n  llmasos info llama-3.1-8b   # a zoo shape\n"
        "  llmasos info --system   # the CPU, its instruction sets and the kernel level in use",
    )
    p.add_argument("model", nargs="?", help="a store name, a model dir, or a zoo shape name")
    p.add_argument("--system", action="store_true", help="the CPU, its instruction sets, and the kernel level and build")

    p = _verb(
        sub,
        "prepare",
        cmd_prepare,
        "clean, deduplicate, tokenize and pack a corpus into shards",
        "  llmasos prepare ./corpus --tokenizer ./my-tokenizer --out ./data\n"
        "  llmasos prepare a.jsonl b.parquet --text-field content --tokenizer llama2 --out ./data --workers 2",
    )
    p.add_argument("inputs", nargs="+", help="text files, directories (recursive), .jsonl or .parquet files")
    p.add_argument("--tokenizer", required=True, help="a tokenizer dir, a model dir or a stored model's name")
    p.add_argument("--out", required=True, help="the data dir to write")
    _force_option(p)
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation (0.01)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    _corpus_options(p)

    p = _verb(
        sub,
        "pretrain",
        cmd_pretrain,
        "train a model from scratch on prepared data (every YAML key is a flag)",
        "  llmasos pretrain --config pretrain.yaml\n"
        "  llmasos pretrain --model tiny-gqa --data ./data --out runs/tiny --max-steps 200 --lr 1e-3\n"
        "  llmasos pretrain --resume runs/tiny              # continue an interrupted run exactly",
    )
    _train_options(p, "pretrain", TrainConfig)

    p = _verb(
        sub,
        "finetune",
        cmd_finetune,
        "fine-tune a model (full, LoRA or QLoRA) on instruction data or a prepared corpus, or by DPO on preference "
        "pairs (every YAML key is a flag)",
        "  llmasos finetune my-model --data alpaca.jsonl --method lora --out runs/ft --epochs 2\n"
        "  llmasos finetune my-model --data prefs.jsonl --method dpo --out runs/dpo          # full DPO\n"
        "  llmasos finetune my-model --data prefs.jsonl --method lora --dpo --out runs/dpo   # DPO of a LoRA adapter\n"
        "  llmasos finetune my-model --data chats.jsonl --method qlora --quantize int4 --merge --out runs/ft\n"
        "  llmasos finetune my-model --data train.jsonl --method full --max-steps 200 --lr 1e-5\n"
        "  torchrun --nproc-per-node 2 -m llmasos finetune my-model --data a.jsonl --strategy fsdp --out runs/ft\n"
        "  llmasos finetune --resume runs/ft",
    )
    p.add_argument("model", nargs="?", help="the model to start from: a store name or a model dir")
    _train_options(p, "finetune", FinetuneConfig, skip=("model",))

    p = _verb(
        sub,
        "export",
        cmd_export,
        "write a model as an HF dir, a GGUF file (llama.cpp, Ollama) or ONNX",
        "  llmasos export my-model --format gguf --dtype q8_0 --out ./export   # + an Ollama Modelfile\n"
        "  llmasos export my-model --format gguf --out ./my-model-f16.gguf --dtype f16\n"
        "  llmasos export ./model.Q4_K_M.gguf --format hf --dtype bf16 --out ./model-hf\n"
        "  llmasos export my-model --format onnx --out ./onnx",
    )
    p.add_argument("model", help="a store name, a model dir or a .gguf file")
    p.add_argument("--format", required=True, choices=["hf", "gguf", "onnx"], help="what to write")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "f32", "f16", "bf16", "q8_0", "q4_0"],
        help="auto keeps the stored dtype; q8_0 and q4_0 are GGUF quantizations (norms stay f32)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="gguf: a .gguf path, or a dir for MODEL-DTYPE.gguf (the Modelfile goes beside it); hf/onnx: a dir",
    )
    _force_option(
        p,
        "replace what is at --out (for gguf: the .gguf file and the Modelfile beside it)",
        "it is an empty dir or this same command wrote it (a dir it writes carries a .llmasos marker, a "
        "Modelfile says so in its first line; a .gguf is never replaced without --force)",
    )

    p = _verb(
        sub,
        "quickstart",
        cmd_quickstart,
        "the whole life cycle offline: train a tokenizer and a small LLaMA on Python's stdlib, evaluate, store and sample it",
        "  llmasos quickstart                 # about 4 minutes on 2 CPU cores\n"
        "  llmasos quickstart --minutes 20    # train longer: a better model",
    )
    p.add_argument("--minutes", type=float, default=3.5, help="pretraining time budget (default 3.5)")
    p.add_argument(
        "--out", default="runs/quickstart", help="the run dir (default runs/quickstart); a rerun reuses its tokenizer and data"
    )
    _force_option(p)
    p.add_argument("--corpus-mb", type=float, default=6.0, help="megabytes of stdlib source to use (default 6)")

    p = _verb(
        sub,
        "tokenizer",
        None,
        "tokenizers: `llmasos tokenizer train` trains a byte-level BPE",
        "  llmasos tokenizer train ./corpus --vocab-size 8000 --out ./my-tokenizer\n"
        "  llmasos tokenizer train data.jsonl --text-field content --vocab-size 32000 --out ./tok",
    )
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = tsub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer that transformers' AutoTokenizer loads",
        description="Train a byte-level BPE (Llama 3 conventions) on text files, directories, "
        "JSONL or Parquet; write tokenizer.json and tokenizer_config.json.",
    )
    t.set_defaults(func=cmd_tokenizer_train)
    t.add_argument("inputs", nargs="+", help="text files, directories (recursive), .jsonl or .parquet files")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special ones included")
    t.add_argument("--out", required=True, help="directory to write the tokenizer into")
    _force_option(t)
    t.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    _corpus_options(t)

    p = _verb(
        sub,
        "generate",
        cmd_generate,
        "complete a prompt (streams on a terminal)",
        "  llmasos generate my-model -p 'def fibonacci(n):' --max-tokens 64 --temperature 0\n"
        "  llmasos generate my-model -p 'Once upon a time' --seed 1 --stop '\\n\\n' --json\n"
        "  llmasos generate my-model -p 'Hello' --quantize int8",
    )
    _model_options(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads it from standard input)")
    _sampling_options(p, 128)
    p.add_argument("--json", action="store_true", help="print text, token ids, finish reason and timing as JSON")

    p = _verb(
        sub,
        "chat",
        cmd_chat,
        "talk with a model, using its chat template, streaming the answers",
        "  llmasos chat my-model\n  llmasos chat my-model --system 'You are terse.' --temperature 0.7\n"
        "  llmasos chat my-model --tools tools.json --tool-choice required",
    )
    _model_options(p)
    p.add_argument("--system", help="a system message at the start of the conversation")
    p.add_argument("--tools", metavar="FILE.json", help="tools the model may call: OpenAI's list of functions, as JSON")
    p.add_argument(
        "--tool-choice",
        metavar="CHOICE",
        help="auto (default), required, none, or a function's name: the model must call that one",
    )
    _sampling_options(p, 512)

    p = _verb(
        sub,
        "eval",
        cmd_eval,
        "evaluate a model: built-in or YAML tasks, lm-eval tasks, perplexity; compare runs",
        "  llmasos eval my-model --tasks arithmetic_qa,science_mc --limit 20 --out results.json\n"
        "  llmasos eval my-model --tasks ./my_task.yaml --num-fewshot 0\n"
        "  llmasos eval my-model --perplexity ./text.txt --stride 256   # or a prepared data dir (val split)\n"
        "  llmasos eval my-model --tasks lm_eval:hellaswag --limit 100\n"
        "  llmasos eval my-model --tasks lm_eval:my_task --include-path ./lm_eval_tasks\n"
        "  llmasos eval compare base.json tuned.json",
    )
    _model_options(p)
    p.add_argument("results", nargs="*", metavar="RESULTS.json", help="with `compare` as MODEL: results files")
    p.add_argument("--tasks", help="comma-separated: built-in names (`llmasos tasks`), task YAMLs, lm_eval:TASK")
    p.add_argument("--limit", type=int, help="the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--include-path", help="a directory of lm-eval task YAMLs (for lm_eval:TASK)")
    p.add_argument(
        "--perplexity",
        metavar="FILE_OR_DATA_DIR",
        help="sliding-window perplexity of a text file or of a prepared data dir's val split",
    )
    p.add_argument("--stride", type=int, help="perplexity window stride in tokens (default half the context)")
    p.add_argument("--out", help="write the results as JSON here")
    _force_option(p, ours="it is a results file `llmasos eval` wrote")

    _verb(sub, "tasks", cmd_tasks, "list the built-in evaluation tasks (name, kind, samples, metrics)", "  llmasos tasks")
    p = _verb(
        sub,
        "serve",
        cmd_serve,
        "serve the store's models (or one MODEL) over OpenAI's and Ollama's HTTP APIs, with a web chat page",
        "  llmasos serve                                # every stored model, each loaded on its first request\n"
        "  llmasos serve --models tiny,llama2 --keep-alive 10m --memory-budget 12GiB\n"
        "  llmasos serve my-model                       # one model, loaded now: http://127.0.0.1:8000, chat page at /\n"
        "  llmasos serve my-model --port 8080 --api-key sk-local --served-model-name llama\n"
        "  llmasos serve ./model-dir --host 0.0.0.0 --max-running 32 --quantize int8\n"
        "  llmasos serve my-model --lora sql=runs/sql/adapter --lora chat=runs/chat/adapter   # model: sql, chat\n"
        "  llmasos serve my-model --allow-runtime-lora --api-key sk-local   # POST /v1/load_lora_adapter loads more",
    )
    _model_options(p)
    p.set_defaults(model=None)
    [model] = [a for a in p._actions if a.dest == "model"]
    model.nargs, model.help = "?", "a store name or a model dir: serve it alone, loaded at start-up (default: the whole store)"
    p.add_argument("--models", metavar="A,B,C", help="without MODEL: serve these stored models only (default: all)")
    p.add_argument(
        "--keep-alive",
        default="5m",
        metavar="DURATION",
        help="without MODEL: how long a model stays loaded after its last request (5m, 1h, 30s; 0 unloads at once, "
        "-1 never; a request's keep_alive overrides it; default 5m)",
    )
    p.add_argument(
        "--memory-budget",
        type=_size,
        metavar="SIZE",
        help="without MODEL: what the loaded models may take together, weights and KV caches (e.g. 12GiB; default 3/4 "
        "of the memory available at start-up, 90%% of the GPU's free memory on a GPU); the least recently used idle "
        "models are unloaded to make room",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize and the "
        "API docs; LLMASOS_API_KEY=KEY in the environment does the same and keeps the key out of `ps`",
    )
    p.add_argument("--served-model-name", help="the model id clients send and see (default: MODEL as given)")
    p.add_argument("--max-running", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences that may wait for a slot; beyond that requests get 503 (default 256)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        help="the longest sequence (prompt + answer) served (default: the model's context, capped by the KV cache budget)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=_size,
        metavar="SIZE",
        help="memory each model's KV cache may take, e.g. 4GiB (default: half of the memory available at start-up "
        "with MODEL; without, at most a quarter of --memory-budget); a request that cannot fit is refused with the "
        "largest that does",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=_batched_tokens,
        default="auto",
        metavar="N|auto",
        help="tokens one engine step computes: each running sequence's next one, then chunks of the prompts being "
        "prefilled, so that a long prompt never stalls the running streams for long. auto (the default): chunks "
        "that take about as long as the running streams' decode step, as timed on this machine; 0: every prompt "
        "whole, in one step",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not keep prompts' KV for later requests that start alike (a chat's next turn, a shared system "
        "prompt); by default it is kept in what --kv-cache-memory leaves beside the running sequences",
    )
    p.add_argument("--cors-origin", action="append", help="a browser origin allowed to call the API (repeatable)")
    p.add_argument(
        "--lora",
        action="append",
        type=_lora_module,
        metavar="NAME=PATH",
        help="serve the LoRA adapter dir PATH (PEFT format, as `finetune --method lora` writes it) beside the model, "
        "unmerged, as the model id NAME (repeatable; served with or without --allow-runtime-lora)",
    )
    p.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="let clients load and unload LoRA adapters while serving (POST /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter, vLLM's routes), from any dir this server can read; LLMASOS_ALLOW_RUNTIME_LORA=1 "
        "does the same (default: off, the routes answer 403)",
    )
    p.add_argument(
        "--pooling",
        choices=["mean", "last", "cls", "max"],
        help="how /v1/embeddings pools a text's hidden states (default: what the model's files name, else mean)",
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds running requests get to finish (default 30)"
    )

    p = _verb(
        sub,
        "ps",
        cmd_ps,
        "show the models a running `llmasos serve` has loaded: memory, KV cache, sequences, when each unloads",
        "  llmasos ps\n  llmasos ps --port 8080 --json\n  LLMASOS_HOST=gpu-box:8000 llmasos ps",
    )
    _client_options(p)
    p.add_argument("--json", action="store_true", help="print the server's answer (GET /api/ps) as JSON")
    p = _verb(
        sub,
        "stop",
        cmd_stop,
        "unload a model from a running `llmasos serve` now (once its requests have ended)",
        "  llmasos stop tiny\n  llmasos stop llama2 --port 8080",
    )
    p.add_argument("model", help="the served model's name")
    _client_options(p)
    return parser


def _lora_module(value: str) -> tuple[str, str]:
    """NAME=PATH (or a bare PATH, named after its dir)."""
    from pathlib import Path

    name, sep, path = value.partition("=")
    if not sep:
        name, path = Path(value.rstrip("/")).name, value
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=PATH")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except LLMasOSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
