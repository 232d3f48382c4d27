"""Automatic prefix caching: the KV of prompts (and answers) kept after their requests end, for any later
request that starts with the same tokens (multi-turn chat re-sends the whole history; agents and RAG share
long system prompts), as vLLM's automatic prefix caching and llama.cpp's `cache_prompt` do.

The engine's KV cache is one contiguous row per running sequence (a batched decode step, and the CPU
kernels' `decode_block`, read rows 0..n-1 of one tensor per layer), so cached KV cannot be shared in place
as paged attention shares blocks: a hit is copied into the new request's row, and only the rest of its
prompt is prefilled. Given that copy, the cache is a pool of fixed-size blocks outside the rows, as vLLM
keys them: block i of a sequence is found under (the id of block i-1, block i's tokens), so one key names
the whole prefix up to it, and a prefix shared by many sequences (a system prompt under every
conversation) is held once. Fixed-size blocks make the memory exact (each costs `block_size` cache slots
and is freed the moment it is evicted) and the lookup a walk down a dict. (A token-granular trie, as
llama.cpp's slots and SGLang's radix tree match, would reuse up to `block_size - 1` more tokens a hit, for
tensors that must be split when sequences diverge inside a node.) Keys hold the tokens themselves, not a
hash of them, so two different prefixes never collide.

Eviction is least-recently-used. A lookup or store touches a chain's blocks deepest first, so a block is
always older than its parent and the oldest block is a leaf: evicting in age order never strands a
descendant. The engine says how many bytes the pool may hold at each moment (what its KV budget leaves
beside the running rows) and evicts to make room before its rows grow, so cached prefixes never push a
running request out or the total over the budget.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable

import torch
from torch import Tensor

# Tokens a block holds (vLLM's default).
BLOCK_SIZE = 16


class Block:
    __slots__ = ("id", "key", "parent", "children", "kv")

    def __init__(self, id: int, key: tuple, parent: Block | None, kv: Tensor):
        self.id, self.key, self.parent, self.kv = id, key, parent, kv
        self.children = 0


class PrefixCache:
    """Blocks of cached KV, keyed by their prefix. `match` finds a prompt's cached prefix and `load` copies
    it into a cache row; `store` keeps a row's full blocks. `block_bytes`: what one block takes (the engine's
    slot bytes times `block_size`)."""

    def __init__(self, block_bytes: int, block_size: int = BLOCK_SIZE):
        self.block_size, self.block_bytes = block_size, block_bytes
        self.blocks: dict[tuple, Block] = {}
        self.lru: OrderedDict[int, Block] = OrderedDict()  # oldest first; a block is always older than its parent
        self._ids = itertools.count()
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of them, found cached

    @property
    def bytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def _chain(self, tokens: list[int], length: int, salt: Hashable) -> list[Block]:
        """The cached blocks of tokens[:length] (whole blocks), from the first, as far as they go."""
        chain: list[Block] = []
        parent: Block | None = None
        b = self.block_size
        for start in range(0, length - length % b, b):
            block = self.blocks.get((parent.id if parent else (salt,), *tokens[start : start + b]))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # deepest first: every parent ends up newer than its children
            self.lru.move_to_end(block.id)

    def match(self, tokens: list[int], limit: int, salt: Hashable = None) -> list[Block]:
        """The longest cached prefix of tokens[:limit], in whole blocks (counted in `queries` and `hits`)."""
        chain = self._chain(tokens, limit, salt)
        self._touch(chain)
        self.queries += len(tokens)
        self.hits += len(chain) * self.block_size
        return chain

    def load(self, chain: list[Block], k: list[Tensor], v: list[Tensor], row: int) -> int:
        """Copy the blocks' keys and values into slots 0.. of `row` (k, v: the cache's per-layer tensors);
        returns the tokens copied."""
        if not chain:
            return 0
        n = len(chain) * self.block_size
        kv = torch.stack([block.kv for block in chain], dim=2).flatten(2, 3)  # [2 * layers, heads, n, head_dim]
        for i, cache in enumerate(k + v):
            cache[row, :, :n] = kv[i]
        return n

    def store(
        self, tokens: list[int], length: int, k: list[Tensor], v: list[Tensor], row: int, room: int, salt: Hashable = None
    ) -> None:
        """Keep the whole blocks of tokens[:length], whose keys and values are in `row`, that are not cached
        yet, as far as `room` bytes (the pool's limit now) allow after evicting older blocks."""
        b = self.block_size
        chain = self._chain(tokens, length, salt)
        self._touch(chain)
        want = length // b - len(chain)
        if want <= 0:
            return
        # Evict the oldest blocks (never this chain's: it was just touched, so it is the newest).
        while self.bytes + want * self.block_bytes > room and len(self.lru) > len(chain):
            self._evict_oldest()
        fits = min(want, (room - self.bytes) // self.block_bytes)
        if fits <= 0:
            return
        start, end = len(chain) * b, (len(chain) + fits) * b
        kv = torch.stack([cache[row, :, start:end] for cache in k + v]).unflatten(2, (fits, b))
        parent = chain[-1] if chain else None
        for j in range(fits):
            key = (parent.id if parent else (salt,), *tokens[start + j * b : start + (j + 1) * b])
            block = Block(next(self._ids), key, parent, kv[:, :, j].clone(memory_format=torch.contiguous_format))
            if parent is not None:
                parent.children += 1
            self.blocks[key] = block
            self.lru[block.id] = block
            chain.append(block)
            parent = block
        self._touch(chain)

    def evict(self, nbytes: int) -> None:
        """Free at least `nbytes` (or everything), oldest blocks first."""
        freed = 0
        while freed < nbytes and self.lru:
            self._evict_oldest()
            freed += self.block_bytes

    def shrink_to(self, room: int) -> None:
        """Evict the oldest blocks until the pool holds at most `room` bytes."""
        self.evict(self.bytes - room)

    def _evict_oldest(self) -> None:
        _, block = self.lru.popitem(last=False)
        assert block.children == 0, "the oldest block is always a leaf"
        del self.blocks[block.key]
        if block.parent is not None:
            block.parent.children -= 1

    def clear(self) -> None:
        self.blocks.clear()
        self.lru.clear()
