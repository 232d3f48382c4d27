"""Structured outputs: decoding constrained to a JSON Schema, any JSON object, a regex, a list of choices or a
Lark grammar, so that a model (even a random one) can only write what the constraint allows.

`StructuredOutputs` (vLLM's `StructuredOutputsParams` fields) is checked and compiled when it is made, so a
schema with an unsupported keyword or that is not valid JSON Schema is refused, naming it, before any work.
Each constrained sequence gets its own matcher; before a sampling step `Grammars.mask` computes the token
masks of the constrained rows (one bit per token, all rows in one call) and sets the logits of the
disallowed tokens to -inf in those rows only, so constrained and free requests share a batch and a free
one samples exactly what it would alone. A sequence ends ("stop") as soon as its grammar is complete.
JSON is written as `json.dumps` writes it: ", " and ": " between items and keys and no other whitespace
(a schema's own `x-guidance` options may ask for more), so a model cannot loop on blank space.

The library is llguidance, not xgrammar. Both compile JSON Schema and regexes to token masks on the CPU;
measured on this project's 32,000-token BPE, one thread (`benchmarks/structured.py` prints the figures):

- compile: llguidance 1-2 ms a schema, xgrammar 15-70 ms (it precomputes a mask cache per grammar);
- mask per token: llguidance ~30 us (median; up to a few ms on a schema's first tokens), xgrammar 3-10 us;
  either is well under 1% of a decode step of the ~110M model (10-15 ms at batch 1, ~40 ms at 16);
- unsupported JSON Schema keywords (uniqueItems, not, if/then, contains, dependentRequired, unknown
  formats, remote $refs): llguidance refuses them by name; xgrammar ignores them silently and constrains
  to a looser schema, so an output could fail the user's own validation;
- weight: llguidance is one 3 MB wheel with no dependencies, imported in 0.1 s; xgrammar pulls in
  transformers, triton and tvm-ffi and takes ~6.5 s to import.

Refusing what it cannot enforce, and costing nothing at start-up, decided it.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from llmasos.errors import InvalidRequestError

if TYPE_CHECKING:
    from llmasos.tokenization import Tokenizer

# How JSON is written under a schema: as json.dumps writes it (a schema's "x-guidance" may override).
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_CHOICES = 4096
MAX_COMPILED = 64  # grammars kept compiled per engine


class StructuredOutputError(InvalidRequestError):
    """A constraint that cannot be used: `field` is the StructuredOutputs field, `detail` what is wrong with it
    (the server reports it under its own field name)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"structured.{kind}: {detail}", param=f"structured.{kind}")
        self.kind, self.detail = kind, detail


@dataclass
class StructuredOutputs:
    """Exactly one constraint: `json` (a JSON Schema, as a dict or its JSON text), `json_object=True` (any JSON
    object), `regex`, `choice` (one of these strings) or `grammar` (a Lark grammar in llguidance's dialect)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    compiled: str = field(init=False, repr=False, compare=False)  # llguidance's grammar

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(
                given[1] if given else "json",
                f"give exactly one of {', '.join(KINDS)}" + (f" (got {', '.join(given)})" if given else ""),
            )
        kind = given[0]
        import llguidance

        if kind == "json":
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(_schema(self.json), defaults=JSON_OPTIONS)
            except (ValueError, TypeError) as e:  # not JSON (a Python object in the dict), or not an object schema
                raise StructuredOutputError(kind, str(e)) from None
        elif kind == "json_object":
            if self.json_object is not True:
                raise StructuredOutputError(kind, "must be true or false")
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        elif kind == "regex":
            if not isinstance(self.regex, str) or not self.regex:
                raise StructuredOutputError(kind, "must be a non-empty string")
            grammar = llguidance.LLMatcher.grammar_from_regex(self.regex)
        elif kind == "choice":
            choice = self.choice
            if not isinstance(choice, list) or not choice or not all(isinstance(c, str) and c for c in choice):
                raise StructuredOutputError(kind, "must be a non-empty list of non-empty strings")
            if len(choice) > MAX_CHOICES:
                raise StructuredOutputError(kind, f"at most {MAX_CHOICES} choices")
            grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
        else:
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise StructuredOutputError(kind, "must be a non-empty Lark grammar")
            grammar = llguidance.LLMatcher.grammar_from_lark(self.grammar)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
        if failed:
            raise StructuredOutputError(kind, _explain(messages[0], self.json if kind == "json" else None))
        self.compiled = grammar

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


def _schema(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise StructuredOutputError("json", f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise StructuredOutputError("json", f"a JSON Schema is an object, got {type(value).__name__}")
    return value


def _explain(message: str, schema: Any) -> str:
    """llguidance's message, shorter, and for unsupported keywords with where they are in the schema."""
    message = message.split("\n<state>")[0].strip()
    found = re.match(r"Unimplemented keys: (\[.*\])", message)
    if found is None or not isinstance(schema, (dict, str)):
        return message.replace("\n", " ")
    keys = json.loads(found.group(1))
    schema = json.loads(schema) if isinstance(schema, str) else schema
    places = [p for p in _paths(schema, set(keys))]
    where = f" (at {', '.join(places[:5])})" if places else ""
    return f"unsupported JSON Schema keyword{'s' if len(keys) > 1 else ''}: {', '.join(keys)}{where}"


def _paths(node: Any, keys: set[str], path: str = "") -> list[str]:
    """Where in a schema the keywords `keys` appear, as dotted paths ('properties.tags.uniqueItems')."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else k
            if k in keys:
                found.append(here)
            found += _paths(v, keys, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _paths(v, keys, f"{path}[{i}]")
    return found


# ---- token masks -------------------------------------------------------------------------------------------


class _Vocabulary:
    """A SentencePiece vocabulary as llguidance's TokenizerWrapper reads it: each token's bytes."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.backend
        special = tokenizer.special_ids
        self.tokens = []
        for i in range(sp.GetPieceSize()):
            piece = sp.IdToPiece(i)
            if sp.IsByte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif i in special:
                self.tokens.append(piece.encode())
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self.special_token_ids = sorted(special)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self._sp = sp

    def __call__(self, text: str) -> list[int]:
        """Text as tokens where it is a continuation: no dummy "▁" before it (encoded after an unk, then dropped)."""
        unk = self._sp.IdToPiece(self._sp.unk_id())
        return self._sp.EncodeAsIds(unk + text)[len(self._sp.EncodeAsIds(unk)) :]


def compile_grammar(ll: Any, grammar: str) -> Any:
    """llguidance's matcher for `grammar` (its own JSON form) over the tokenizer `ll`: the compile, ~1-2 ms for a
    schema, more for a large one. `Grammars.compile` calls it; never on an engine's thread."""
    import llguidance

    return llguidance.LLMatcher(ll, grammar, log_level=0)


class Grammars:
    """One engine's grammar machinery: its tokenizer as llguidance sees it (built on first use: ~0.5 s for 32,000
    tokens; `warm` builds it ahead, off the engine's thread), new matchers, and the masks of a step.

    Requests with the same grammar share its compiled form and the lexer states llguidance builds as it goes
    (each matcher is a copy of one kept per grammar), so only the first pays for them. With `overlap` (a model on
    an accelerator), a decode step's masks are computed on a worker thread, several rows at once on llguidance's
    thread pool, while the forward pass runs (`prepare`; llguidance lets go of the GIL). On a CPU those threads
    take cores from the forward pass (measured on 2 cores, ~110M shape, 16 rows: the step went from ~170 ms to
    ~260-650 ms), so there the masks are computed row after row in the sampling step: ~0.8 ms for 16 rows, the
    step's time unchanged within noise."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, overlap: bool = False):
        self.tokenizer, self.vocab_size, self.overlap = tokenizer, vocab_size, overlap
        self.width = max(vocab_size, tokenizer.vocab_size)  # tokens the masks cover
        self._lock = threading.Lock()
        self._ll: Any = None
        self._executor: Any = None
        self._worker: ThreadPoolExecutor | None = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # grammar -> a matcher that never moves (LRU)
        self._pending: tuple[list, Future] | None = None  # the matchers whose masks are being computed, the job

    def warm(self):
        """llguidance's tokenizer for this vocabulary (built once)."""
        with self._lock:
            if self._ll is None:
                import llguidance

                tok = self.tokenizer
                stops = sorted(tok.stop_ids) or None
                if tok.kind == "tokenizers":
                    source: Any = tok.backend.to_str()
                else:
                    source = llguidance.TokenizerWrapper(_Vocabulary(tok))
                self._ll = llguidance.LLTokenizer(source, n_vocab=self.width, eos_token=stops)
                if self.overlap:
                    self._executor = llguidance.LLExecutor()
                    self._worker = ThreadPoolExecutor(1, thread_name_prefix="llmasos-grammar")
            return self._ll

    def compile(self, structured: StructuredOutputs) -> Any:
        """The grammar compiled for this vocabulary (a matcher that never moves, kept for the next requests: the
        MAX_COMPILED used last); a grammar that this vocabulary cannot write is refused here. Callers compile
        before they queue a request, on their own thread (the server on a worker thread, `Engine.add` on the
        caller's), so that the engine's thread only copies it (`matchers`). Thread-safe: the compile runs outside
        the lock, so a lookup never waits for one; of two threads that compile the same grammar at once, both get
        the template kept first."""
        ll = self.warm()
        key = structured.compiled
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template
        template = compile_grammar(ll, key)
        if template.is_error():
            raise StructuredOutputError(structured.kind, _explain(template.get_error(), None))
        with self._lock:
            template = self._compiled.setdefault(key, template)
            self._compiled.move_to_end(key)
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        return template

    def matchers(self, structured: StructuredOutputs, n: int) -> list:
        """n fresh matchers for a request: copies of its compiled grammar (compiled ahead by the caller; one that
        MAX_COMPILED others pushed out of the cache meanwhile is compiled again here)."""
        template = self.compile(structured)
        return [template.deep_copy() for _ in range(n)]

    def _fill(self, matchers: list, rows: list[int]) -> Tensor:
        import llguidance.torch

        bitmask = torch.zeros(len(rows), (self.width + 31) // 32, dtype=torch.int32)
        if self._executor is not None:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, [(matchers[i], j) for j, i in enumerate(rows)], bitmask)
        else:
            for j, i in enumerate(rows):
                llguidance.torch.fill_next_token_bitmask(matchers[i], bitmask, j)
        return bitmask

    def prepare(self, matchers: list) -> None:
        """Start computing the masks of these rows (None: a free row) on the worker thread; `mask` with the same
        matchers, before any of them takes a token, uses them."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if rows and self._worker is not None:
            self._pending = (list(matchers), self._worker.submit(self._fill, list(matchers), rows))

    def mask(self, logits: Tensor, matchers: list) -> Tensor:
        """`logits` [B, V] with the tokens each row's matcher forbids at -inf (a new tensor); a row whose matcher
        is None is left as it is. Raises if a matcher allows no token (it is in an error state)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        pending, self._pending = self._pending, None
        if not rows:
            return logits
        if pending is not None and len(pending[0]) == len(matchers) and all(a is b for a, b in zip(pending[0], matchers)):
            bitmask = pending[1].result()
        else:
            bitmask = self._fill(matchers, rows)
        allowed = self._unpack(bitmask, logits.device)[:, : logits.shape[-1]]
        empty = (~allowed.any(-1)).nonzero().flatten().tolist()
        if empty:
            error = matchers[rows[empty[0]]].get_error() or "the grammar allows no token here"
            raise ValueError(f"structured output: {error.split(chr(10))[0]}")
        if len(rows) == len(matchers):
            return logits.masked_fill(~allowed, float("-inf"))
        index = torch.tensor(rows, device=logits.device)
        return logits.index_put((index,), logits[index].masked_fill(~allowed, float("-inf")))

    @staticmethod
    def _unpack(bitmask: Tensor, device: torch.device) -> Tensor:
        """int32 words [R, W] -> bool [R, 32 W]: bit j of word w is token 32 w + j."""
        if device.type == "cpu" and sys.byteorder == "little":  # numpy's unpackbits: one C loop
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
            return torch.from_numpy(bits).view(torch.bool)  # 0/1 bytes are bools: no copy
        words = bitmask.to(device, non_blocking=True)
        shifts = torch.arange(32, device=device, dtype=torch.int32)
        return ((words[:, :, None] >> shifts) & 1).bool().flatten(1)


def advance(matcher, token: int) -> bool:
    """Feed a sampled token to a sequence's matcher; True when the grammar is complete (nothing may follow)."""
    if not matcher.consume_token(token):
        raise ValueError(f"structured output: token {token} does not fit the grammar: {matcher.get_error().splitlines()[0]}")
    return matcher.is_stopped()
