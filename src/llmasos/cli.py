"""`llmasos`: the command line. Thin: parses arguments and calls the packages; torch is imported
only by the verbs that need it, so `llmasos --help` answers at once."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from llmasos.errors import LLMasOSError

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
        zoo.add_row(name, _human_count(c.num_parameters()), str(c.num_hidden_layers), str(c.hidden_size),
                    f"{c.num_attention_heads}/{c.num_key_value_heads}", str(c.max_position_embeddings),
                    ZOO[name].get("hf_id", "-"))
    console.print(zoo)
    stored = Table(title=f"Stored models ({models_dir()})", title_justify="left")
    for col in ("name", "architecture", "params", "dtype", "size"):
        stored.add_column(col)
    for path in stored_models():
        try:
            c = load_config(path)
            stored.add_row(path.name, c.architecture, _human_count(c.num_parameters()), c.dtype,
                           _human_bytes(dir_size(path)))
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


def cmd_info(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmasos.checkpoints.store import dir_size, resolve
    from llmasos.models.zoo import ZOO, zoo_config

    rows: list[tuple[str, str]] = []
    if args.model in ZOO and not __import__("pathlib").Path(args.model).exists():
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
        ("rope", f"theta {config.rope_theta:g}, {config.rope_type}"
                 + (f" x{config.rope_scaling['factor']:g}" if config.rope_scaling else "")),
        ("tied embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("dtype", config.dtype),
    ]
    if path is not None:
        rows.append(("size on disk", _human_bytes(dir_size(path) if path.is_dir() else path.stat().st_size)))
        from llmasos.tokenization import Tokenizer

        try:
            tok = Tokenizer(path)
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


# ---- parser ----------------------------------------------------------------------------------------


def _verb(sub, name: str, func: Callable, help: str, examples: str) -> argparse.ArgumentParser:
    VERBS[name] = (help, examples)
    p = sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmasos",
        description="LLMasOS: the whole life of a LLaMA-family model. MODEL is a store name or a model dir path.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    _verb(sub, "models", cmd_models, "list the zoo (named shapes) and the models in the local store",
          "  llmasos models")

    p = _verb(sub, "pull", cmd_pull, "import a model into the store (HF dir, Meta dir, zoo name or hub id)",
              "  llmasos pull ./my-hf-model --name my-model\n"
              "  llmasos pull ./llama-2-7b            # Meta params.json + consolidated.*.pth\n"
              "  llmasos pull TinyLlama/TinyLlama-1.1B-Chat-v1.0   # needs network access")
    p.add_argument("source", help="a local HF dir, a Meta checkpoint dir, a zoo name or a hub id (owner/name)")
    p.add_argument("--name", help="store name (default: from the source)")
    p.add_argument("--force", action="store_true", help="replace a stored model of the same name")

    p = _verb(sub, "info", cmd_info, "architecture, shape, parameters, dtype, size and tokenizer of a model",
              "  llmasos info my-model\n  llmasos info ./path/to/model-dir\n  llmasos info llama-3.1-8b   # a zoo shape")
    p.add_argument("model", help="a store name, a model dir, or a zoo shape name")
    return parser


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
