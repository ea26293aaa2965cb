"""The compressed prefix cache: a radix tree over token-id prefixes whose nodes hold `KVFoldCache` snapshots.

Canonical segmentation makes reuse exact. Every prompt is prefilled in blocks of `block` tokens on a cache made
with `compress_appends=True`, so each block is compressed on arrival by the method (query-agnostic: it cannot see
what comes later), and a `cache.fork()` snapshot is stored after each full block. The last 1..block tokens are
prefilled last and never stored (they produce the first logits). A request forks the deepest snapshot on its
prefix and prefills only the rest, so a warm request runs exactly the computation of a cold one from that point:
same greedy output. Snapshots exist only at block boundaries, so each edge of the tree is one block of token ids
(a radix tree whose radix is a block: no edge splitting is ever needed). Trees are namespaced by (model id,
canonical method spec): snapshots are never shared across models or methods.

What is counted against the budget (`held_nbytes`): forks share pages copy-on-write, all snapshots grown from one
root share that root's page pools, and a request forked from a snapshot allocates its new pages in the same
pools. So the prefix cache counts each distinct pool once at its full capacity (used pages, free pages kept for
reuse, and pages of a running request forked from it), plus every snapshot's page tables. This is exactly what
the pools have allocated, never less; summing `snapshot.nbytes()` instead would count a shared pool once per
snapshot. Evicting a snapshot frees only the pages no one else references, and memory returns to the allocator
when a pool's tail is trimmed or its last user goes: `make_room` re-measures after each eviction.
The server's caches draw on one `pages.PoolSet` (one pool per layer and store for every request, so one kernel
launch decodes the whole batch): such a pool counts only its used pages, since any request reuses its free ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..cache import KVFoldCache

Namespace = tuple[str, str]  # (model id, canonical method spec)


def held_nbytes(caches: Iterable[KVFoldCache]) -> int:
    """Bytes held by the union of `caches`: each distinct page pool once (whole capacity) plus every table. A
    `PoolSet`'s pool (the server's, shared by every request) counts its used pages: its free ones are room for
    whichever request allocates next, and it grows only past the most pages used at once."""
    pools, tables = {}, 0
    for cache in caches:
        for layer in cache.layers:
            if layer.is_initialized:
                pools.update((id(pool), pool) for pool in layer.pools())
                tables += layer.table_nbytes()
    return sum(pool.used_nbytes() if pool.shared else pool.nbytes() for pool in pools.values()) + tables


def release(cache: KVFoldCache) -> None:
    """Give back every page reference of `cache` now (not when the garbage collector gets to it); the cache is
    empty and unusable afterwards. Runs under inference mode, which reference counts made there require."""
    with torch.inference_mode():
        for layer in cache.layers:
            if layer.is_initialized:
                for _, rows in layer.stores():
                    rows.clear()


def trim(caches: Iterable[KVFoldCache]) -> None:
    """Return the free pages at the end of each pool to the allocator (safe while forks share the pool)."""
    pools = {id(p): p for c in caches for layer in c.layers if layer.is_initialized for p in layer.pools()}
    for pool in pools.values():
        pool.trim()


@dataclass(eq=False)
class Node:
    """A block boundary on a prefix; `snapshot` is None for a path node whose snapshot was evicted."""

    parent: Node | None
    edge: tuple[int, ...]
    depth: int  # tokens from the root
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    snapshot: KVFoldCache | None = None
    last_used: int = 0


class PrefixCache:
    """Radix tree of compressed snapshots under a byte budget, evicted least recently used first.

    Only the engine's worker thread calls the mutating methods; `held`, `hits`, `misses` are plain numbers that
    other threads may read for metrics.
    """

    def __init__(self, budget: int, block: int) -> None:
        self.budget, self.block = budget, block
        self._roots: dict[Namespace, Node] = {}
        self._holders: dict[Node, None] = {}  # nodes holding a snapshot
        self._clock = itertools.count(1)
        self.hits = self.misses = self.evictions = 0
        self.held = 0  # bytes held by the snapshots, as last measured (see `held_nbytes`)

    def cacheable_blocks(self, n_tokens: int) -> int:
        """Full blocks of an n-token prompt that get snapshots: at least one token is always left to prefill."""
        return max(0, (n_tokens - 1) // self.block)

    @property
    def snapshots(self) -> int:
        return len(self._holders)

    def _blocks(self, ids: Sequence[int]) -> list[tuple[int, ...]]:
        if len(ids) % self.block:
            raise ValueError(f"prefix of {len(ids)} tokens is not a whole number of {self.block}-token blocks")
        return [tuple(ids[i:i + self.block]) for i in range(0, len(ids), self.block)]

    def match(self, namespace: Namespace, ids: Sequence[int]) -> tuple[int, KVFoldCache | None]:
        """(tokens covered, snapshot) of the deepest snapshot on the block prefix `ids`; (0, None) if none.

        The caller forks the snapshot. The matched path is marked as used (ancestors too). Counts a hit or miss
        when `ids` holds at least one block.
        """
        node, best, path = self._roots.get(namespace), None, []
        for edge in self._blocks(ids):
            node = node.children.get(edge) if node is not None else None
            if node is None:
                break
            path.append(node)
            if node.snapshot is not None:
                best = node
        if best is not None:
            tick = next(self._clock)
            for n in path[:path.index(best) + 1]:
                n.last_used = tick
        if ids:
            self.hits += best is not None
            self.misses += best is None
        return (best.depth, best.snapshot) if best is not None else (0, None)

    def insert(self, namespace: Namespace, ids: Sequence[int], snapshot: KVFoldCache) -> bool:
        """Store `snapshot` (a fork the tree now owns) for the block prefix `ids`. False if one is already there
        (the given one is released)."""
        node = self._roots.setdefault(namespace, Node(None, (), 0))
        tick = next(self._clock)
        for edge in self._blocks(ids):
            child = node.children.get(edge)
            if child is None:
                child = node.children[edge] = Node(node, edge, node.depth + len(edge))
            node = child
            node.last_used = tick
        if node.snapshot is not None or node.depth == 0:
            release(snapshot)
            return False
        node.snapshot = snapshot
        self._holders[node] = None
        self.held = held_nbytes(self._snapshots())
        return True

    def _snapshots(self) -> list[KVFoldCache]:
        return [node.snapshot for node in self._holders]

    def evict_one(self) -> bool:
        """Drop the least recently used snapshot (the deepest first among equals). False when none is left."""
        if not self._holders:
            return False
        node = min(self._holders, key=lambda n: (n.last_used, -n.depth))
        del self._holders[node]
        release(node.snapshot)
        node.snapshot = None
        self.evictions += 1
        while node.parent is not None and node.snapshot is None and not node.children:  # prune dead branches
            del node.parent.children[node.edge]
            node = node.parent
        for namespace, root in list(self._roots.items()):
            if not root.children:
                del self._roots[namespace]
        return True

    def make_room(self, reserve: int = 0, live: Sequence[KVFoldCache] = ()) -> bool:
        """Evict until snapshots + `live` caches + `reserve` bytes fit the budget. False if they cannot (then
        every snapshot is gone). `live` caches are never touched, only measured."""
        while True:
            total = held_nbytes([*self._snapshots(), *live])
            if total + reserve <= self.budget:
                break
            trim([*self._snapshots(), *live])
            total = held_nbytes([*self._snapshots(), *live])
            if total + reserve <= self.budget or not self.evict_one():
                break
        self.held = held_nbytes(self._snapshots())
        return total + reserve <= self.budget

    def clear(self) -> None:
        while self.evict_one():
            pass
        self.held = 0


def kv_upper_bound(config, compressor, tokens: int, element_size: int) -> int:
    """Bytes that `tokens` more tokens can take in a KVFoldCache of batch 1, whatever the method: uncompressed
    K/V in max(model dtype, float16) plus positions, two partly filled pages per row, tables and per-layer
    buffers. Eviction and packing only hold less, so admission by this bound is safe (and conservative)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rows = text.num_key_value_heads
    per_token = 2 * head_dim * max(element_size, 2) + 4
    window = max(int(getattr(compressor.scorer, "window", 0) or 0), 1)
    per_layer = rows * ((tokens + 2 * 64) * per_token + 8 * (tokens // 16 + 4)) \
        + 4 * head_dim * head_dim + text.num_attention_heads * head_dim * window * 4
    return text.num_hidden_layers * per_layer
