"""One attention layer's compressed store, and the handle `update()` returns.

Each layer stores its tokens per row (one row per batch element and KV head) in pages: full-precision pages for
the newest tokens and, with a quantizer, packed pages for the older ones. `update()` does not concatenate
anything: it returns a `StagedKV` handle, and kvfold's registered attention function (`kvfold.attention`) uses
it to run prefill attention, compress and store; reading the store is `reading.StoreReader`'s part, packing
tokens into a quantizer's pages `packing.Packer`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from .compressor import Compressor
from .errors import KVFoldError
from .methods.base import COMMITTED, ScoreInputs, top_mask
from .packing import Packer, gather_tokens
from .pages import Field, PagedRows, PagePool, PoolSet
from .reading import StoreReader

TAIL_PAGE = 16  # tokens per full-precision page in front of a quantizer


@dataclass(frozen=True)
class StagedKV:
    """What `update()` hands the attention function: the layer and this step's new keys and values."""

    layer: "KVFoldLayer"
    keys: torch.Tensor  # [batch, kv_heads, new_tokens, head_dim]
    values: torch.Tensor
    start: int  # sequence index of the first new token

    @property
    def shape(self) -> torch.Size:
        return self.keys.shape

    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.keys.shape[2], device=self.keys.device)


def compact(tensors: dict[str, torch.Tensor], keep: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gather the kept tokens of each row to its front, in order.

    tensors[name]: [batch, heads, tokens, ...]; keep: [batch, heads, tokens] bool.
    Returns ({name: [batch * heads, max_kept, ...]}, kept count per row (on the CPU)).
    """
    rows, tokens = keep.shape[0] * keep.shape[1], keep.shape[2]
    keep = keep.reshape(rows, tokens)
    if bool(keep.all()):  # every token kept (a decoded token, an uncompressed prompt): nothing to gather
        return ({name: t.reshape(rows, tokens, *t.shape[3:]) for name, t in tensors.items()},
                torch.full((rows,), tokens, dtype=torch.long))
    counts = keep.sum(dim=1)
    width = int(counts.max()) if rows else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    out = {name: gather_tokens(t.reshape(rows, tokens, *t.shape[3:]), order) for name, t in tensors.items()}
    return out, counts.cpu()


class KVFoldLayer(Packer, StoreReader, CacheLayerMixin):
    """One attention layer's compressed store. Sliding-window layers also drop pages that left their window."""

    is_compileable = False
    is_croppable = False

    def __init__(self, compressor: Compressor, sliding_window: int | None = None, page_size: int = 64,
                 layer_idx: int = 0, num_layers: int = 1) -> None:
        super().__init__()
        self.compressor = compressor
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        # With a quantizer the full-precision pages only hold the short tail: small pages waste less.
        self.page_size = math.gcd(compressor.quantizer.group, TAIL_PAGE) if compressor.quantizer else page_size
        self.seen = 0
        self.full: PagedRows | None = None
        self.packed: PagedRows | None = None
        self.sinks: PagedRows | None = None  # a quantizer's `sink` first tokens per row, in full precision
        self.recent_queries: tuple[torch.Tensor, torch.Tensor] | None = None  # see `_remember_queries`
        self.valid_seen: torch.Tensor | None = None  # [batch] real (non-padding) tokens seen
        self.scale = 1.0
        self.compress_appends = False  # compress later multi-token turns too (chat keeps its history compressed)
        self.chunking = False  # inside a chunked prefill: every chunk is stored, then the whole store is evicted
        self.probe_tokens = 0  # chunked prefill: the forward's last tokens only score (a repeated question)
        self.peak_row_tokens = 0  # the most tokens any row has held (the cache's own high-water mark)
        self.rotation: torch.Tensor | None = None  # [head_dim, head_dim]: packed pages hold keys @ rotation
        self.value_rotation: torch.Tensor | None = None  # ... and values @ value_rotation (often the same matrix)
        self.clip = (1.0, 1.0)  # per-row clip quantiles of the rotated keys and values
        self.inv_freq: torch.Tensor | None = None  # RoPE frequencies, set by the cache from the model config
        self.fast = None  # a `fastpath.FastLayer` while the fast decode loop runs
        self.lowrank_group = None  # xkv: the `methods.xkv.LayerGroup` this layer reports its prompt to
        self.lowrank = None  # xkv: the group's `GroupLatents` once the prompt is factored
        self.pool_set: PoolSet | None = None  # pools shared with other caches (a server's requests), else its own

    # ---- transformers' layer protocol -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, self.kv_heads, _, self.head_dim = key_states.shape
        self.batch_size = batch
        self.dtype, self.device = key_states.dtype, key_states.device
        quantizer = self.compressor.quantizer
        full_dtype = torch.float16 if quantizer else self.dtype  # KIVI keeps its residual in float16
        size, dim = self.page_size, self.head_dim
        group = quantizer.group if quantizer else size
        full_fields = {"k": Field((size, dim), full_dtype), "v": Field((size, dim), full_dtype),
                       "pos": Field((size,), torch.int32)}
        self.full = PagedRows(self._new_pool("full", full_fields, size), batch * self.kv_heads)
        if quantizer:
            self.packed = PagedRows(self._new_pool("packed", quantizer.fields(dim), group), batch * self.kv_heads)
            if quantizer.sink:
                self.sinks = PagedRows(self._new_pool("sinks", full_fields, size), batch * self.kv_heads)
        if self.compressor.rotation is not None:
            key_rotation, value_rotation = self.compressor.rotation.matrices(dim, self.layer_idx)
            self.rotation = key_rotation.to(self.device)
            self.value_rotation = self.rotation if value_rotation is key_rotation else value_rotation.to(self.device)
            self.clip = self.compressor.rotation.clip_ratios(self.layer_idx)
        self.valid_seen = torch.zeros(batch, dtype=torch.long)
        self.is_initialized = True

    def _new_pool(self, store: str, fields: dict[str, Field], page_size: int) -> PagePool:
        if self.pool_set is None:
            return PagePool(fields, page_size, self.device)
        return self.pool_set.pool((self.layer_idx, store), fields, page_size, self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        staged = StagedKV(self, key_states, value_states, self.seen)
        self.seen += key_states.shape[2]
        return staged, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def stores(self) -> list[tuple[str, PagedRows]]:
        """The row stores present, in reading order: sinks, packed pages, the full-precision tail."""
        return [(name, rows) for name, rows in (("sinks", self.sinks), ("packed", self.packed), ("full", self.full))
                if rows is not None]

    def reset(self) -> None:
        for _, rows in self.stores():
            rows.clear()
        self.seen, self.recent_queries, self.lowrank = 0, None, None
        if self.valid_seen is not None:
            self.valid_seen.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise KVFoldError("beam search is not supported by kvfold's cache yet; use greedy or sampling (num_beams=1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise KVFoldError("kvfold's cache cannot be cropped (assisted/speculative generation is not supported yet)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise KVFoldError("kvfold's cache does not support num_return_sequences > 1 yet; fork() the cache instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise KVFoldError("kvfold's cache does not support selecting batch rows yet")

    # ---- storing ----------------------------------------------------------------------------------------------
    @property
    def stored_tokens(self) -> int:
        return int(self.row_lengths().sum())

    def row_lengths(self) -> torch.Tensor:
        """Tokens held per row [batch, kv_heads] (low-rank + packed + full precision)."""
        total = sum(rows.lengths for _, rows in self.stores()).view(self.batch_size, self.kv_heads)
        if self.lowrank is not None:
            total += torch.tensor([p.numel() for p in self.lowrank.positions]).view(-1, 1)
        return total

    def full_rows(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The full-precision tail in one block: {"k", "v", "pos"} [batch * kv_heads, width, ...] as stored (width:
        the longest row) and valid [batch * kv_heads, width]. For eviction, sinks and xkv, which read it whole."""
        width = int(self.full.lengths.max())
        fields, valid = next(self.full.read(("k", "v", "pos"), page_chunk=max(1, self.full.table.shape[1])))
        return {n: t.flatten(1, 2)[:, :width] for n, t in fields.items()}, valid[:, :width]

    def ingest(self, staged: StagedKV, query: torch.Tensor, valid: torch.Tensor, scale: float) -> None:
        """Store the tokens of a multi-token forward, compressed by the method when it is the prefill.

        valid [batch, tokens]: False for padding and, on sliding layers, tokens outside the last query's window.
        Inside a chunked prefill (`chunking`) the chunk is stored whole, then the store is evicted back to its
        budget with the chunk's own queries; `probe_tokens` trailing tokens (the question, repeated as the
        observation window) are scored with but not stored, and their positions are given back.
        """
        keys, values, positions = staged.keys, staged.values, staged.positions()
        query_positions = positions
        if self.probe_tokens:
            n = keys.shape[2] - self.probe_tokens
            keys, values, positions, valid = keys[:, :, :n], values[:, :, :n], positions[:n], valid[:, :n]
            self.seen -= self.probe_tokens
        batch, heads, tokens, _ = keys.shape
        valid = valid.to(keys.device)
        self.scale = scale
        self.valid_seen += valid.sum(dim=1).cpu()
        keep = valid.unsqueeze(1).expand(batch, heads, tokens)
        evicts, first = self.compressor.evicts, self.stored_tokens == 0
        if evicts and not self.chunking and (first or self.compress_appends):
            queries, q_pos = self._observation(query, query_positions)
            inputs = ScoreInputs(queries, q_pos, keys, values, positions.view(1, 1, -1).expand(batch, heads, tokens),
                                 keep, scale, self.inv_freq)
            keep = self._keep_mask(inputs, valid.sum(dim=1).cpu())
            keys, values = self._merge(keys, values, keep, inputs.valid)
        saliency = None
        quantizer = self.compressor.quantizer
        if quantizer is not None and quantizer.ranks_tokens and first and not (self.chunking and evicts):
            saliency = quantizer.saliency(ScoreInputs(
                query, query_positions, keys, values, positions.view(1, 1, -1).expand(batch, heads, tokens), keep,
                scale))
        self._remember_queries(query[:, :, :tokens], positions)
        self._append_rows(keys, values, positions, keep, saliency=saliency)
        if self.lowrank_group is not None and first:
            if self.chunking:
                raise KVFoldError("xkv factors a whole prompt at once; drop the prefill chunking (prefill_chunk / "
                                  "--prefill-chunk)")
            self.lowrank_group.report(self)
        if evicts and self.chunking:
            self._recompress(*self._observation(query, query_positions))
            if self.packed is not None and not self.compressor.quantizer.defer:
                self._pack_kept()
        if self.chunking:  # the chunk's pages that packing or eviction emptied go back to the allocator now, so a
            # chunked prefill's peak holds one chunk of one layer beyond what the layers keep, not one per layer
            self._give_back_free_pages()

    def append(self, staged: StagedKV, query: torch.Tensor) -> None:
        """Store decoded tokens (all valid) in the full-precision tail. Call `after_decode()` after attending."""
        keys = staged.keys
        batch, heads, tokens, _ = keys.shape
        self.valid_seen += tokens
        self._remember_queries(query, staged.positions())
        if tokens == 1:  # one token per row, all kept: straight into each row's next slot, as the fast loop writes
            self.full.reserve_tokens(1)
            self.full.write_next(self.token_rows(staged, staged.positions()), self.full.table, self.full.lengths)
            self.peak_row_tokens = max(self.peak_row_tokens, int(self.row_lengths().max()))
            if self.is_sliding:
                self._drop_out_of_window()
            return
        keep = torch.ones(batch, heads, tokens, dtype=torch.bool, device=keys.device)
        self._append_rows(keys, staged.values, staged.positions(), keep, pack=False)

    @staticmethod
    def token_rows(staged: StagedKV, position: torch.Tensor) -> dict[str, torch.Tensor]:
        """One decode token as the rows `PagedRows.write_next` stores: k, v [rows, dim] and the one-element
        `position` (int32) for every row."""
        batch, heads, _, dim = staged.keys.shape
        rows = batch * heads
        return {"k": staged.keys.reshape(rows, dim), "v": staged.values.reshape(rows, dim),
                "pos": position.to(torch.int32).expand(rows)}

    def after_decode(self, tokens: int) -> None:
        """The clocked work of decoding, after the step(s) that brought `seen` to its value attended: re-apply the
        budget each time `seen` passes a multiple of `every` (decode-time compression, evicting from the
        full-precision tail), then pack the tail's whole groups each time it passes a multiple of the quantizer's
        `group`. On a clock shared by all rows, so
        the fast loop (`kvfold.decoding`) can run the steps in between without the host and do the same work."""
        if self._ticked(self.compressor.scorer.every, tokens):  # before packing: packed tokens are final
            self._recompress(*self.recent_window(max(1, self.compressor.scorer.window)))
        if self.packed is not None and self._ticked(self.compressor.quantizer.group, tokens):
            self._pack_full_groups()

    def _ticked(self, period: int, tokens: int) -> bool:
        return bool(period) and self.seen // period > (self.seen - tokens) // period

    def finish_chunks(self) -> None:
        """End of a chunked prefill: pack what eviction kept (packing waits so packed tokens are never evicted) and
        give the pool pages the chunks needed back to the allocator."""
        self.chunking, self.probe_tokens = False, 0
        if self.packed is not None and self.is_initialized:
            self._pack_kept()
        self._give_back_free_pages()

    def _pack_kept(self) -> None:
        """After a chunk's eviction (or the last chunk, with `defer`): pack what the tail holds beyond the residual,
        each row's first tokens to the sinks first, once. Packed tokens are final: later chunks evict from the tail
        only (see `Quantizer`)."""
        if self.sinks is not None and int(self.sinks.lengths.sum()) == 0:
            self._sinks_from_full()
        self._pack_full_groups()

    def _give_back_free_pages(self) -> None:
        for _, rows in self.stores() if self.is_initialized else ():
            rows.defragment()
            rows.pool.trim()

    def _keep_mask(self, inputs: ScoreInputs, n_tokens: torch.Tensor,
                   committed: torch.Tensor | None = None) -> torch.Tensor:
        """Which of `inputs`' valid tokens the method keeps, when `n_tokens` [batch] tokens have been read.

        `committed` [batch, heads, tokens] marks tokens that stay whatever they score (packed ones). The budget
        decides how many tokens each row keeps from everyone's scores, as without them; each row then keeps its
        committed tokens first and its best others up to that count. A row whose committed tokens already pass its
        count (a head whose share shrank: Ada-KV, Task-KV) keeps them all and nothing else."""
        scores = self.compressor.scorer.score(inputs)
        count = self.compressor.scorer.keep_count(n_tokens).to(scores.device)
        keep = self.compressor.budget.select(scores, count, self.layer_idx, self.num_layers, inputs)
        keep = inputs.valid & keep & torch.isfinite(scores)
        if committed is None:
            return keep
        first = torch.where(committed, COMMITTED + inputs.positions.double(), scores)
        rows = first.shape[0] * first.shape[1]
        keep_first = top_mask(first.reshape(rows, -1), keep.sum(dim=-1).reshape(rows)).view_as(keep)
        return inputs.valid & keep_first & torch.isfinite(scores)

    def _merge(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With a `merge` method, fold the evicted valid tokens into the kept ones; otherwise unchanged."""
        merger = self.compressor.merger
        return (keys, values) if merger is None else merger.merge(keys, values, keep, valid)

    def _observation(self, query: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries the scorer reads and their positions: the last `window` ones, or all (`observes_all`)."""
        scorer = self.compressor.scorer
        window = query.shape[2] if scorer.observes_all else max(1, min(scorer.window, query.shape[2]))
        return query[:, :, -window:], positions[-window:]

    def _remember_queries(self, query: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the newest queries that decode-time compression (the scorer's window) or a token-ranking quantizer
        (`remembered_queries`) reads later: a ring of fixed tensors, query position p in slot p % size, written in
        place from device indices, so a captured CUDA graph's replays keep it up to date (`recent_window` reads it)."""
        scorer, quantizer = self.compressor.scorer, self.compressor.quantizer
        size = max(max(1, scorer.window) if scorer.every else 0, quantizer.remembered_queries if quantizer else 0)
        if not size:
            return
        if self.recent_queries is None:
            batch, heads, _, dim = query.shape
            self.recent_queries = (query.new_zeros(batch, heads, size, dim),
                                   torch.full((size,), -1, dtype=torch.long, device=query.device))
        ring, ring_positions = self.recent_queries
        taken = min(query.shape[2], size)
        newest = positions[-taken:].to(ring_positions.device, torch.long)
        slots = newest % size
        ring.index_copy_(2, slots, query[:, :, -taken:].to(ring.dtype))
        ring_positions.index_copy_(0, slots, newest)

    def recent_window(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest `n` (default: all) remembered queries [batch, heads, n, dim] and their positions [n], oldest
        first."""
        ring, ring_positions = self.recent_queries
        order = torch.argsort(ring_positions)
        held = int((ring_positions >= 0).sum())
        order = order[order.numel() - min(held, n or held):]
        return ring[:, :, order], ring_positions[order]

    def _append_rows(self, keys, values, positions, keep, pack: bool = True, saliency=None) -> None:
        """Append kept tokens [batch, heads, tokens] to each row, then pack full groups (unless `pack` is False:
        decoding packs on a clock, see `after_decode`) and slide windows. `saliency` [batch, heads, tokens] ranks
        the tokens a first store packs, for quantizers that mix precisions (`ranks_tokens`)."""
        batch, heads, tokens, dim = keys.shape
        pos = positions.view(1, 1, -1).expand(batch, heads, tokens).to(torch.int32)
        rows = {"k": keys, "v": values, "pos": pos} | ({"sal": saliency} if saliency is not None else {})
        kept, counts = compact(rows, keep)
        self.peak_row_tokens = max(self.peak_row_tokens, int((self.row_lengths().flatten().cpu() + counts).max()))
        defer = self.chunking and self.compressor.evicts  # chunked eviction reads full-precision tokens only
        if self.packed is not None and self.stored_tokens == 0 and not defer:
            self._store_first(kept, counts)
        else:
            self.full.append(kept, counts)
        if self.packed is not None and not defer and pack:
            self._pack_full_groups()
        if self.is_sliding:
            self._drop_out_of_window()

    def _drop_out_of_window(self) -> None:
        """Free whole pages, oldest first, whose every token is outside the sliding window of the next query."""
        oldest_needed = self.seen - self.sliding_window
        for _, rows in self.stores():
            while True:
                candidates = torch.nonzero(rows.lengths >= rows.page_size).squeeze(1)
                if candidates.numel() == 0:
                    break
                first = rows.table[candidates, 0].to(self.device)
                last_pos = rows.pool.tensors["pos"][first].amax(dim=-1).cpu()  # token-ranking pages mix positions
                candidates = candidates[last_pos < oldest_needed]
                if candidates.numel() == 0:
                    break
                rows.pool.release(rows.pop_first_pages(candidates))

    def _recompress(self, queries: torch.Tensor, query_positions: torch.Tensor) -> None:
        """Score every stored token with `queries` and evict full-precision ones down to the budget of all tokens
        seen so far (decode-time compression, and each chunk of a chunked prefill). Tokens already packed (and
        sinks) are scored with the rest, from their decoded pages, but stay: they take their part of the budget."""
        if int(self.full.lengths.max()) == 0:
            return
        rows, valid = self.full_rows()
        shape = (self.batch_size, self.kv_heads, valid.shape[1])
        flat = {n: t.reshape(*shape, *t.shape[2:]) for n, t in rows.items()}
        valid = valid.reshape(shape)
        committed_slots = sum(store.table.shape[1] * store.page_size for name, store in self.stores() if name != "full")
        if committed_slots:
            keys, values, positions, all_valid = self._candidates(flat, valid, committed_slots)
            committed = torch.zeros_like(all_valid)
            committed[..., :committed_slots] = all_valid[..., :committed_slots]
        else:
            keys, values, positions, all_valid, committed = flat["k"], flat["v"], flat["pos"].long(), valid, None
        inputs = ScoreInputs(queries, query_positions, keys, values, positions, all_valid, self.scale, self.inv_freq)
        keep = self._keep_mask(inputs, self.valid_seen, committed)[..., keys.shape[2] - valid.shape[2]:]
        flat["k"], flat["v"] = self._merge(flat["k"], flat["v"], keep, valid)
        kept, counts = compact(flat, keep)
        self.full.fill(kept, counts)

    def _candidates(self, tail: dict[str, torch.Tensor], valid: torch.Tensor, committed_slots: int):
        """The sinks' and packed pages' tokens (decoded, in the tail's dtype) followed by the tail's, as eviction
        scores them: keys, values [batch, heads, slots, dim], positions, valid [batch, heads, slots]. Filled in
        place one page chunk at a time, so the float32 decode never holds the whole store."""
        batch, heads, width = valid.shape
        slots = committed_slots + width
        keys = tail["k"].new_empty(batch, heads, slots, self.head_dim)
        values = tail["v"].new_empty(batch, heads, slots, self.head_dim)
        positions = torch.empty(batch, heads, slots, dtype=torch.long, device=valid.device)
        all_valid = torch.zeros(batch, heads, slots, dtype=torch.bool, device=valid.device)
        at = 0
        for chunk in self.chunks(only=("sinks", "packed")):
            span = slice(at, at + chunk.keys.shape[1])
            keys[:, :, span] = chunk.keys.view(batch, heads, -1, self.head_dim)
            values[:, :, span] = chunk.values.view(batch, heads, -1, self.head_dim)
            positions[:, :, span] = chunk.positions.view(batch, heads, -1)
            all_valid[:, :, span] = chunk.valid.view(batch, heads, -1)
            at = span.stop
        assert at == committed_slots, (at, committed_slots)
        keys[:, :, at:], values[:, :, at:] = tail["k"], tail["v"]
        positions[:, :, at:], all_valid[:, :, at:] = tail["pos"], valid
        return keys, values, positions, all_valid

    # ---- accounting and sharing --------------------------------------------------------------------------------
    def pools(self) -> list[PagePool]:
        return [rows.pool for _, rows in self.stores()]

    def table_nbytes(self) -> int:
        """Page tables, row lengths, the recent-query buffer (decode-time compression) and the rotation."""
        return sum(rows.table_nbytes() for _, rows in self.stores()) + self.buffer_nbytes()

    def referenced_nbytes(self) -> int:
        return sum(rows.nbytes() for _, rows in self.stores()) + self.buffer_nbytes()

    def buffer_nbytes(self) -> int:
        """The recent-query buffer (decode-time compression) and the rotation matrices."""
        queries = sum(t.numel() * t.element_size() for t in self.recent_queries) if self.recent_queries else 0
        matrices = {id(m): m for m in (self.rotation, self.value_rotation) if m is not None}.values()
        return queries + sum(m.numel() * m.element_size() for m in matrices)

    def fresh_copy(self) -> "KVFoldLayer":
        """An empty layer configured as this one (a fork of a layer that has stored nothing yet)."""
        child = KVFoldLayer(self.compressor, self.sliding_window, self.page_size, self.layer_idx, self.num_layers)
        child.compress_appends, child.inv_freq, child.pool_set = self.compress_appends, self.inv_freq, self.pool_set
        return child

    def fork(self) -> "KVFoldLayer":
        child = KVFoldLayer(self.compressor, self.sliding_window, self.page_size, self.layer_idx, self.num_layers)
        child.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("full", "packed", "sinks", "fast")})
        for name in ("full", "packed", "sinks"):
            rows = getattr(self, name)
            setattr(child, name, rows.fork() if rows is not None else None)
        if self.valid_seen is not None:
            child.valid_seen = self.valid_seen.clone()
        if self.recent_queries is not None:  # written in place: each cache its own ring
            child.recent_queries = tuple(t.clone() for t in self.recent_queries)
        return child
