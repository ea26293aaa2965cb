"""Reading a layer's store: attention over its pages (the Triton decode kernel or the PyTorch reference), the
store as decoded chunks, and which positions each row holds."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .kernels import use_triton
from .kernels.reference import KVChunk, paged_attention

PAGE_CHUNK = 32  # pages per row read at once by the reference decode
QUERY_BLOCK = 256  # query tokens per step when a multi-token turn attends to the store
FEW_QUERY_HEADS = 16  # a multi-token turn of up to this many query heads per KV row (tokens x GQA group) reads the
# store through the decode kernel (e.g. verifying a speculative draft), its own tokens merged in as one more split.
# At 16 the 16-bit kernels' query tile stays one 16-row MMA block; the packed kernel's is 16 x its value groups.
SDPA_QUERY_BLOCK = 1024  # query tokens per SDPA call over the gathered store (bounds the [rows, block, keys] mask)
SDPA_MASK_ELEMENTS = 2**27  # the most elements of one `sdpa_over_store` call's boolean mask


def use_gathered_sdpa(device: torch.device) -> bool:
    """Whether a multi-token turn on `device` attends through SDPA over the gathered store (CUDA, unless
    `KVFOLD_KERNELS=reference`) rather than the float32 reference."""
    return device.type == "cuda" and os.environ.get("KVFOLD_KERNELS", "auto") != "reference"


def sdpa_over_store(query: torch.Tensor, query_positions: torch.Tensor, chunks: Sequence[KVChunk], scale: float,
                    sliding_window: int | None = None, block: int = SDPA_QUERY_BLOCK) -> torch.Tensor:
    """`paged_attention`'s definition computed by `scaled_dot_product_attention` on the gathered store.

    query [rows, group, n, dim] (a GQA group's heads per row), query_positions [n]; the chunks (the decoded store
    and the turn's own tokens) are concatenated per row in the query's dtype, and each block of queries runs one
    SDPA call (the group's heads folded into the query axis) with a boolean mask: valid, causal by position,
    inside the sliding window. A compressed store is small (its budget), so gathering it for one layer costs what
    the reference's decoded list did; this lets a chunked prefill on a GPU run at SDPA speed. Returns
    [rows, group, n, dim] in the query's dtype; a query that sees no key gets zeros (as the reference).
    """
    rows, group, n, dim = query.shape
    keys = torch.cat([c.keys for c in chunks], dim=1).to(query.dtype).unsqueeze(1)  # [rows, 1, S, dim]
    values = torch.cat([c.values.masked_fill(~c.valid.unsqueeze(-1), 0.0) for c in chunks], dim=1)
    values = values.to(query.dtype).unsqueeze(1)
    key_pos = torch.cat([c.positions for c in chunks], dim=1).long().view(rows, 1, 1, -1)
    valid = torch.cat([c.valid for c in chunks], dim=1).view(rows, 1, 1, -1)
    block = _mask_block(rows, group, keys.shape[2], block)  # the mask becomes an additive bias of that size
    out = torch.empty_like(query)
    for start in range(0, n, block):
        width = min(block, n - start)
        q_pos = query_positions[start:start + width].long().to(key_pos.device).repeat(group).view(1, 1, -1, 1)
        visible = valid & (key_pos <= q_pos)
        if sliding_window is not None:
            visible &= q_pos - key_pos < sliding_window
        q = query[:, :, start:start + width].reshape(rows, 1, group * width, dim)
        part = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scale)
        part = part.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
        out[:, :, start:start + width] = part.view(rows, group, width, dim)
    return out


def _mask_block(rows: int, group: int, keys: int, block: int = SDPA_QUERY_BLOCK) -> int:
    """Query tokens per `sdpa_over_store` call: its mask holds rows x (group * block) x keys elements."""
    return max(1, min(block, SDPA_MASK_ELEMENTS // max(1, rows * group * keys)))


def _flash_width(dim: int) -> int:
    """The head dimension `sdpa_after_store` attends in: `dim` plus the validity channel, a multiple of 8."""
    return -(-(dim + 1) // 8) * 8


def flash_after_store_applies(query: torch.Tensor) -> bool:
    """Whether `sdpa_after_store` runs a fused kernel (FlashAttention or memory-efficient attention, with the causal
    bias aligned lower right) for this query: CUDA, a 16-bit dtype, and torch accepting the shapes. Elsewhere on
    CUDA torch would materialise a [rows, group, n, keys] mask, so callers use `sdpa_over_store` instead."""
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    rows, group, n, dim = query.shape
    q = query.new_empty(rows, group, n, _flash_width(dim))
    kv = query.new_empty(rows, 1, n + 1, _flash_width(dim)).expand(rows, group, n + 1, -1)
    params = SDPAParams(q, kv, kv, None, 0.0, False, False)  # how `CausalBias` asks (is_causal False)
    return bool(can_use_flash_attention(params) or can_use_efficient_attention(params))


def sdpa_after_store(query: torch.Tensor, stored: Iterable[KVChunk], new: KVChunk, scale: float,
                     stored_slots: int | None = None) -> torch.Tensor:
    """`paged_attention`'s definition for a turn whose every stored key precedes it (a prefill chunk after the
    earlier ones), as one `scaled_dot_product_attention` call with a lower-right causal bias and no mask tensor.

    query [rows, group, n, dim]; `new` holds the turn's n tokens in order. Which stored or new keys are valid
    differs per row, so validity rides in one extra channel: the query's is 1, a key's is 0 if valid, else the
    dtype's most negative value / 4 (a score no softmax keeps); invalid keys and values are zeroed, so a query that
    sees no valid key gets exactly 0 (as the reference). The head dimension is padded to a multiple of 8 for the
    flash kernel. The store is gathered once in the query's dtype, chunk by chunk into a buffer of `stored_slots`
    tokens when given (so the decoded float32 chunks are never all held at once). On the CPU the causal bias is
    materialised (tests). Returns [rows, group, n, dim] in the query's dtype.
    """
    rows, group, n, dim = query.shape
    if stored_slots is None:
        stored = list(stored)
        stored_slots = sum(c.keys.shape[1] for c in stored)
    total, width = stored_slots + n, _flash_width(dim)
    invalid_score = torch.finfo(query.dtype).min / 4
    keys = query.new_zeros(rows, 1, total, width)
    keys[..., dim] = invalid_score  # slots no chunk fills stay invalid
    values = query.new_zeros(rows, 1, total, width)
    at = 0
    for chunk in itertools.chain(stored, [new]):
        length = chunk.keys.shape[1]
        if chunk is new:
            at = total - n
        elif at + length > stored_slots:
            raise ValueError(f"the store yielded more than the {stored_slots} slots it was given")
        span, valid = slice(at, at + length), chunk.valid.unsqueeze(-1)
        keys[:, 0, span, :dim] = chunk.keys.masked_fill(~valid, 0.0)
        values[:, 0, span, :dim] = chunk.values.masked_fill(~valid, 0.0)
        keys[:, 0, span, dim] = torch.where(chunk.valid, 0.0, invalid_score).to(query.dtype)
        at = span.stop
    q = query.new_zeros(rows, group, n, width)
    q[..., :dim] = query
    q[..., dim] = 1.0
    bias = causal_lower_right(n, total)
    if q.device.type != "cuda":
        bias = bias._materialize(q.device)
    shape = (rows, group, total, width)  # the GQA group's heads share one KV head: a view, no copy
    out = F.scaled_dot_product_attention(q, keys.expand(shape), values.expand(shape), attn_mask=bias, scale=scale)
    return out[..., :dim]


class StoreReader:
    """The reading half of `KVFoldLayer` (which provides `full`, `packed`, `compressor`, `kv_heads`, ...)."""

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """Sequence indices held by each row, sorted: [batch][kv_head] -> 1-D tensor (for tests and inspection)."""
        held = []
        if self.lowrank is not None:
            held.append(self.lowrank.row_positions(self.kv_heads).to(torch.int32).cpu())
        for _, rows in self.stores():
            for fields, valid in rows.read(("pos",), PAGE_CHUNK):
                held.append(fields["pos"].flatten(1).masked_fill(~valid, -1).cpu())
        flat = torch.cat(held, dim=1) if held else torch.empty(self.batch_size * self.kv_heads, 0, dtype=torch.int32)
        per_row = [row[row >= 0].sort().values for row in flat]
        return [per_row[b * self.kv_heads:(b + 1) * self.kv_heads] for b in range(self.batch_size)]

    def stored_slots(self) -> int | None:
        """How many token slots `chunks()` yields (padding included), or None for a low-rank layer (its latents'
        count is known only once rebuilt)."""
        if self.lowrank is not None:
            return None
        return sum(rows.table.shape[1] * rows.page_size for _, rows in self.stores())

    def chunks(self, latent: bool = False, only: tuple[str, ...] | None = None):
        """The stored K/V as decoded chunks, oldest first: low-rank latents (rebuilt, or with `latent` as a
        `LatentChunk` that `paged_attention` reads in the latent space), sinks, packed pages, the tail; `only`
        names the stores to read (e.g. ("sinks", "packed")), leaving out the latents."""
        if self.lowrank is not None and only is None:
            yield (self.lowrank.layer_latents(self.layer_idx, self.kv_heads) if latent
                   else KVChunk(*self.lowrank.layer_kv(self.layer_idx, self.kv_heads)))
        for name, rows in self.stores():
            if only is not None and name not in only:
                continue
            if name == "packed":
                for fields, valid in rows.read(tuple(rows.pool.fields), PAGE_CHUNK):
                    k, v = self.compressor.quantizer.decode(fields)
                    if self.rotation is not None:  # packed pages hold x @ R; R is orthogonal
                        k, v = k @ self.rotation.T, v @ self.value_rotation.T
                    yield KVChunk(k, v, fields["pos"].flatten(1), valid)
                continue
            for fields, valid in rows.read(("k", "v", "pos"), PAGE_CHUNK, alias=True):  # read before any write
                yield KVChunk(fields["k"].flatten(1, 2).float(), fields["v"].flatten(1, 2).float(),
                              fields["pos"].flatten(1), valid)

    def attend(self, query: torch.Tensor, positions: torch.Tensor, scale: float,
               new: KVChunk | None = None) -> torch.Tensor:
        """Attention of queries [batch, q_heads, n, dim] over the store, plus `new` tokens not stored yet.

        Returns [batch, n, q_heads, dim] in the query's dtype. One query token with nothing unstored runs the
        Triton decode kernel where `kernels.use_triton` allows it, and so does a turn of a few tokens (up to
        FEW_QUERY_HEADS query heads per KV row, no sliding window: e.g. a speculative draft), its own tokens merged
        in as one more split; a longer multi-token turn on CUDA runs SDPA over the gathered store (one flash call
        per layer, `sdpa_after_store`, when the turn's own tokens come with it, no sliding window, and the masked
        blocks of `sdpa_over_store` would take more than one call; else those blocks); everything else the
        reference.
        """
        batch, q_heads, n, dim = query.shape
        group = q_heads // self.kv_heads
        rows = batch * self.kv_heads
        one = n == 1 and new is None
        few = n > 1 and new is not None and group * n <= FEW_QUERY_HEADS and self.sliding_window is None
        parts = self._kernel_parts_for(query) if one or few else None
        if parts is not None and one:
            from .kernels.decode import paged_decode

            out = paged_decode(query.reshape(rows, group, dim), parts, positions[-1:], scale, self.sliding_window,
                               out_dtype=query.dtype)
        elif parts is not None:  # every stored key precedes the turn: the kernel reads the store for all n queries
            from .kernels.decode import new_tokens_partials, paged_decode

            grouped = query.reshape(rows, group, n, dim)
            also = new_tokens_partials(grouped, positions, new.keys, new.values, new.valid, new.positions, scale)
            out = paged_decode(grouped.reshape(rows, group * n, dim), parts, positions[-1:], scale,
                               out_dtype=query.dtype, also=also).view(rows, group, n, dim)
        elif n > 1 and use_gathered_sdpa(query.device):
            grouped = query.reshape(rows, group, n, dim)
            slots = self.stored_slots()
            # One flash call needs the store in a padded copy; the masked blocks win while they are one call
            # (a short turn; on an H200 at 32k, 9 against 12 ms), the flash call once they are many.
            split = n > _mask_block(rows, group, (slots or 0) + n)
            if new is not None and self.sliding_window is None and split and flash_after_store_applies(grouped):
                out = sdpa_after_store(grouped, self.chunks(), new, scale, slots)
            else:
                chunks = [*self.chunks(), *([new] if new is not None else [])]
                out = sdpa_over_store(grouped, positions, chunks, scale, self.sliding_window)
        else:
            stream = itertools.chain(self.chunks(latent=True), [new] if new is not None else [])
            # A long turn (a prefill chunk) attends QUERY_BLOCK queries at a time over the store decoded once; a
            # short one streams the store page chunk by page chunk and never holds it whole.
            chunks = stream if n <= QUERY_BLOCK else list(stream)
            grouped = query.reshape(rows, group, n, dim)
            blocks = []
            for start in range(0, n, QUERY_BLOCK):
                q = grouped[:, :, start:start + QUERY_BLOCK]
                width = q.shape[2]
                part = paged_attention(q.reshape(rows, group * width, dim),
                                       positions[start:start + width].repeat(group), chunks, scale, self.sliding_window)
                blocks.append(part.view(rows, group, width, dim))
            out = torch.cat(blocks, dim=2)
        return out.view(batch, q_heads, n, dim).transpose(1, 2).to(query.dtype)

    def new_chunk(self, staged, valid: torch.Tensor) -> KVChunk:
        """The staged tokens as a chunk the reference attention can read; valid [batch, n]."""
        batch, _, n, dim = staged.keys.shape
        rows = batch * self.kv_heads
        return KVChunk(staged.keys.reshape(rows, n, dim).float(), staged.values.reshape(rows, n, dim).float(),
                       staged.positions().view(1, n).expand(rows, n),
                       valid.unsqueeze(1).expand(batch, self.kv_heads, n).reshape(rows, n))

    def _kernel_parts_for(self, query: torch.Tensor) -> list | None:
        """The store's kernel parts when the Triton decode kernel should and can read it, else None."""
        if not use_triton(query.device) or not self.kernel_readable:
            return None
        from .kernels.decode import supports

        parts = self.kernel_parts()
        return parts if supports(parts, query.shape[-1]) else None

    @property
    def kernel_readable(self) -> bool:
        """Whether the Triton decode kernel can read this store's pages: not low-rank latents, nor mixed-precision
        pages in a sliding-window layer (their slots' positions are not where the kernel's window reads them)."""
        quantizer = self.compressor.quantizer
        mixed_window = quantizer is not None and quantizer.ranks_tokens and self.sliding_window is not None
        return self.compressor.lowrank is None and (quantizer is None or quantizer.has_kernel) and not mixed_window

    def kernel_parts(self, mirrors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> list:
        """The store as the decode kernel reads it: packed pages (if any), then the full-precision pages.
        `mirrors` ({"sinks"|"packed"|"full": (table, lengths)}, int32 on the device) replaces the tables copied from the
        CPU: the fast decode loop's, which its steps update in place."""
        from .kernels.decode import PagedPart

        parts = []
        for name, rows in self.stores():
            t = rows.pool.tensors
            table, lengths = mirrors[name] if mirrors else (rows.table.to(torch.int32).to(self.device),
                                                            rows.lengths.to(torch.int32).to(self.device))
            meta = dict(table=table, lengths=lengths, positions=t["pos"], pages_used=int(rows.pages_per_row().sum()))
            if rows is self.packed:  # a quantizer gives one part, or one per kind of slot (ZipCache's mixed pages)
                described = self.compressor.quantizer.kernel_part(t, self.head_dim)
                parts += [PagedPart(**{**meta, **fields}, rotation=self.rotation, value_rotation=self.value_rotation)
                          for fields in (described if isinstance(described, list) else [described])]
            else:
                parts.append(PagedPart(keys=t["k"], values=t["v"], **meta))
        return parts
