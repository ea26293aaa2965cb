"""The packing half of `KVFoldLayer`: moving full-precision tokens into a quantizer's pages — whole groups of the
oldest tokens, the first `sink` tokens kept aside in full precision, pages arranged by saliency for quantizers that
mix precisions (ZipCache), rotated (and clipped) first when the method rotates."""

from __future__ import annotations

import torch

from .methods.base import top_mask
from .methods.rotate import clip_rows

PACK_TOKENS = 1024  # tail tokens per row that one packing round quantizes at most


def gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [rows, tokens, ...] gathered at index [rows, n] along the tokens: [rows, n, ...]."""
    index = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return torch.gather(tensor, 1, index)


class Packer:
    """Mixin of `KVFoldLayer` (which provides `full`, `packed`, `sinks`, `compressor`, `rotation`, ...)."""

    def _store_first(self, kept: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Fill an empty quantized store directly: whole groups of the oldest tokens packed, the rest in the tail.

        Packing at once (rather than through the tail) means the full-precision pool never holds the whole prompt.
        """
        quantizer = self.compressor.quantizer
        group = quantizer.group
        if self.sinks is not None:
            kept, counts = self._split_sinks(kept, counts)
        n_pages = torch.minimum(torch.clamp(-((quantizer.residual - counts) // group), min=0), counts // group)
        width = int(n_pages.max())
        saliency = kept.pop("sal", None)
        if width and saliency is not None:
            kept = self._arrange_by_saliency(kept, saliency, n_pages)
        if width:
            used = (torch.arange(width).unsqueeze(0) < n_pages.unsqueeze(1)).to(self.device)
            pages = {n: t[:, : width * group].unflatten(1, (width, group))[used] for n, t in kept.items()}
            fields = self._encode(pages["k"], pages["v"])
            fields["pos"] = pages["pos"]
            self.packed.fill_pages(fields, n_pages)
        packed = (n_pages * group).to(self.device)
        tail = counts - n_pages * group
        index = packed.unsqueeze(1) + torch.arange(int(tail.max()), device=self.device).unsqueeze(0)
        index = index.clamp(max=max(0, kept["k"].shape[1] - 1))
        rest = {n: gather_tokens(t, index) for n, t in kept.items()}
        self.full.append(rest, tail)

    def _split_sinks(self, kept: dict[str, torch.Tensor], counts: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Store each row's first `sink` tokens of `kept` [rows, n, ...] in the sinks; return the rest, moved front."""
        taken = counts.clamp(max=self.compressor.quantizer.sink)
        width = int(taken.max()) if taken.numel() else 0
        self.sinks.append({n: t[:, :width] for n, t in kept.items() if n in ("k", "v", "pos")}, taken)
        rest = int((counts - taken).max()) if counts.numel() else 0
        index = taken.to(self.device).unsqueeze(1) + torch.arange(rest, device=self.device).unsqueeze(0)
        index = index.clamp(max=max(0, next(iter(kept.values())).shape[1] - 1))
        return {n: gather_tokens(t, index) for n, t in kept.items()}, counts - taken

    def _sinks_from_full(self) -> None:
        """After a chunked prefill that kept every token in full precision: move each row's first tokens to the
        sinks before the rest is packed."""
        if int(self.full.lengths.max()) == 0:
            return
        kept, _ = self.full_rows()
        rest, counts = self._split_sinks(kept, self.full.lengths.clone())
        self.full.fill(rest, counts)

    def _arrange_by_saliency(self, kept: dict[str, torch.Tensor], saliency: torch.Tensor,
                             n_pages: torch.Tensor) -> dict[str, torch.Tensor]:
        """Permute each row's packed span (its first `n_pages * group` tokens) so that every page's first
        `high_slots` slots hold the span's most salient tokens and the rest its others, each kind in position order;
        tokens past the span stay where they are."""
        quantizer = self.compressor.quantizer
        group, high = quantizer.group, quantizer.high_slots
        rows, width = saliency.shape
        slot = torch.arange(width, device=saliency.device).unsqueeze(0).expand(rows, width)
        span = (n_pages * group).to(saliency.device).unsqueeze(1)
        in_span = slot < span
        salient = top_mask(saliency.masked_fill(~in_span, float("-inf")), (n_pages * high).to(saliency.device))
        salient &= in_span
        other = in_span & ~salient
        salient_rank, other_rank = salient.cumsum(1) - 1, other.cumsum(1) - 1
        dest = torch.where(salient, salient_rank // high * group + salient_rank % high,
                           torch.where(other, other_rank // (group - high) * group + high + other_rank % (group - high),
                                       slot))
        source = torch.empty_like(dest).scatter_(1, dest, slot)
        return {n: gather_tokens(t, source) for n, t in kept.items()}

    def _encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The quantizer's fields of pages of K and V, rotated (and clipped, OSCAR) first when the method rotates."""
        keys, values = keys.float(), values.float()
        if self.rotation is not None:
            keys, values = clip_rows(keys @ self.rotation, self.clip[0]), clip_rows(values @ self.value_rotation,
                                                                                    self.clip[1])
        return self.compressor.quantizer.encode(keys, values)

    def _pack_full_groups(self) -> None:
        """Pack the oldest `group` tail tokens of every row whose tail passed `residual` (and holds a whole group),
        again while any still does: each round packs, for every row left, as many groups as the row that needs the
        fewest, up to PACK_TOKENS tokens (which bounds the round's float32 copies), so a long prefill chunk costs
        a few rounds, not one per group (H200, 4 × 4096-token chunks: 128 rounds of ~30 launches per layer)."""
        quantizer = self.compressor.quantizer
        per_group = quantizer.group // self.page_size
        threshold = max(quantizer.residual + 1, quantizer.group)
        pool = self.full.pool
        while True:
            lengths = self.full.lengths
            due = torch.where(lengths >= threshold, (lengths - threshold) // quantizer.group + 1, 0)
            rows = torch.nonzero(due).squeeze(1)
            if rows.numel() == 0:
                return
            groups = min(int(due[rows].min()), max(1, PACK_TOKENS // quantizer.group))
            ids = self.full.pop_first_pages(rows, groups * per_group).view(len(rows) * groups, per_group)
            dev = ids.to(pool.device)
            group = {n: pool.tensors[n][dev].flatten(1, 2) for n in ("k", "v", "pos")}  # [rows * groups, ...]
            if quantizer.ranks_tokens:
                group = self._order_decoded_page(group, rows.repeat_interleave(groups))
            fields = self._encode(group["k"], group["v"])
            fields["pos"] = group["pos"]
            pool.release(ids.flatten())
            new_ids = self.packed.pool.alloc(len(rows) * groups)
            self.packed.pool.write(new_ids, fields)
            self.packed.push_pages(rows, new_ids.view(len(rows), groups))

    def _order_decoded_page(self, group: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Arrange pages packed from the tail [rows, group, ...] salient-first, ranked by the remembered queries."""
        queries, _ = self.recent_window()
        batch, q_heads, n, dim = queries.shape
        per_row = queries.reshape(batch * self.kv_heads, q_heads // self.kv_heads * n, dim)[rows.to(queries.device)]
        order = self.compressor.quantizer.order_page(per_row, group["k"], self.scale)
        return {name: gather_tokens(t, order) for name, t in group.items()}

