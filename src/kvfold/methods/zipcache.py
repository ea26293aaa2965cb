"""`zipcache`: ZipCache — mixed precision by token saliency: the tokens with the highest *normalized* attention keep
`bits` (4 or 8), the rest are packed to `low` bits (2 or 4); keys per channel, values channel-separable token-wise.

He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification", NeurIPS 2024
(arXiv:2405.14256).

Saliency is the normalized attention score: the attention a token receives, summed over the queries that can see
it, divided by how many of them there are — plain accumulated attention favours early tokens only because more
queries see them (the lower-triangle bias). It never needs the full attention matrix: `probe` of the prompt's
queries (half the newest, half drawn at random with a fixed seed, as in the paper's probe tokens) are read in
blocks. With `probe=1` it is the exact score over every query.

Layout: a page of `group` tokens has `round(group * salient)` high-precision slots and the rest low-precision ones
(the authors' default keeps 60% of tokens at 4 bits, 40% at 2). At prefill the layer ranks the packed span by
saliency and arranges it so each page's high slots hold salient tokens (pages are then not in position order; each
slot stores its position). Keys: min-max per channel over a page's salient slots, and separately over its others
(as the authors' mixed channel-wise mode). Values: each channel divided by the square root of its absolute maximum
over the page (one float16 per channel, the channel-separable part), then min-max per token (one float16 scale
and zero per token) — far fewer parameters than fine groups, yet outlier channels do not swamp a token's grid.

Approximate: every element is rounded to its grid (at most half a step, bounded by the tests). Tokens packed
while decoding (the residual tail, every `group` steps) are ranked inside their own page by the attention of the
last `recent` queries restricted to that page, not by prompt probes; the paper re-estimates saliency from its
streaming probes every 100 steps. The Triton decode kernel reads these pages as two parts over one page table
(`kernel_part`: the high slots and the low ones, each with its bits; float16 dot products); in sliding-window
layers attention over them runs the PyTorch reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import KVFoldError
from ..kernels.reference import SCALE_DTYPE, Quantized, channel_scales, dequantize, quantize
from ..pages import Field
from .base import Quantizer, ScoreInputs, check_fraction, check_int, register, top_mask, window_attention

PROBE_SEED = 0
PROBE_BLOCK = 256  # probe queries read at once: memory stays [batch, q_heads, PROBE_BLOCK, tokens]


@register("zipcache")
@dataclass(frozen=True)
class ZipCache(Quantizer):
    """Salient tokens at `bits`, the rest at `low` bits, in mixed pages; `residual` newest tokens in float16."""

    paper = "ZipCache (He et al., 2024)"
    ranks_tokens: ClassVar[bool] = True

    bits: int = 4
    group: int = 64
    residual: int = 128
    low: int = 2
    salient: float = 0.6
    probe: float = 0.1
    recent: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (4, 8):
            raise KVFoldError(f"zipcache: bits (the salient tokens' precision) must be 4 or 8, got {self.bits!r}")
        if self.low not in (2, 4) or self.low >= self.bits:
            raise KVFoldError(f"zipcache: low (the other tokens' precision) must be 2 or 4 and below bits={self.bits}, "
                              f"got {self.low!r}")
        check_fraction("zipcache: salient", self.salient, "fraction of tokens at high precision", low_open=True,
                       high_open=True)
        check_fraction("zipcache: probe", self.probe, "fraction of prompt queries that probe", low_open=True)
        if not 1 <= self.high_slots < self.group:
            raise KVFoldError(f"zipcache: group={self.group} x salient={self.salient} leaves {self.high_slots} "
                              f"high-precision slots a page; a page needs at least one of each kind: raise group "
                              f"or move salient away from 0 and 1")
        check_int("zipcache: recent", self.recent, 1, "queries remembered to rank decoded tokens")

    @property
    def high_slots(self) -> int:
        """Slots per page that hold salient tokens at `bits`; the other `group - high_slots` hold `low` bits."""
        return round(self.group * self.salient)

    @property
    def remembered_queries(self) -> int:
        return self.recent

    def fields(self, head_dim: int) -> dict[str, Field]:
        if head_dim * self.low % 8:
            raise KVFoldError(f"zipcache: head_dim {head_dim} cannot be packed at {self.low} bits")
        high, low = self.high_slots, self.group - self.high_slots
        channel = Field((head_dim,), SCALE_DTYPE)
        return {
            "k_high": Field((high, head_dim * self.bits // 8), torch.uint8), "k_high_scale": channel,
            "k_high_zero": channel,
            "k_low": Field((low, head_dim * self.low // 8), torch.uint8), "k_low_scale": channel, "k_low_zero": channel,
            "v_high": Field((high, head_dim * self.bits // 8), torch.uint8),
            "v_low": Field((low, head_dim * self.low // 8), torch.uint8),
            "v_channel": channel,
            "v_scale": Field((self.group,), SCALE_DTYPE), "v_zero": Field((self.group,), SCALE_DTYPE),
            "pos": Field((self.group,), torch.int32),
        }

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pages [pages, group, head_dim] whose first `high_slots` tokens are the salient ones."""
        high = self.high_slots
        k_high = quantize(keys[:, :high], self.bits, reduce_dims=(1,))
        k_low = quantize(keys[:, high:], self.low, reduce_dims=(1,))
        channel, scaled = channel_scales(values)  # [pages, head_dim], values / channel
        v_high = quantize(scaled[:, :high], self.bits, reduce_dims=(-1,))
        v_low = quantize(scaled[:, high:], self.low, reduce_dims=(-1,))
        return {"k_high": k_high.codes, "k_high_scale": k_high.scale, "k_high_zero": k_high.zero,
                "k_low": k_low.codes, "k_low_scale": k_low.scale, "k_low_zero": k_low.zero,
                "v_high": v_high.codes, "v_low": v_low.codes, "v_channel": channel,
                "v_scale": torch.cat([v_high.scale, v_low.scale], dim=-1),
                "v_zero": torch.cat([v_high.zero, v_low.zero], dim=-1)}

    def decode(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.high_slots
        per_channel = lambda s: s.unsqueeze(-2)  # noqa: E731 — one scale per channel over a page's slots
        per_token = lambda s: s.unsqueeze(-1)  # noqa: E731
        k = torch.cat([
            dequantize(Quantized(fields["k_high"], fields["k_high_scale"], fields["k_high_zero"]), self.bits, per_channel),
            dequantize(Quantized(fields["k_low"], fields["k_low_scale"], fields["k_low_zero"]), self.low, per_channel),
        ], dim=-2)
        scale, zero = fields["v_scale"], fields["v_zero"]
        v = torch.cat([
            dequantize(Quantized(fields["v_high"], scale[..., :high], zero[..., :high]), self.bits, per_token),
            dequantize(Quantized(fields["v_low"], scale[..., high:], zero[..., high:]), self.low, per_token),
        ], dim=-2) * fields["v_channel"].float().unsqueeze(-2)
        return k.flatten(-3, -2), v.flatten(-3, -2)

    def kernel_part(self, tensors: dict[str, torch.Tensor], head_dim: int) -> list[dict]:
        """Two parts over the same page table: the `high_slots` slots of each page at `bits`, the others at `low`
        (the packed kernel's mixed-page mode: row lengths in whole pages of `group` tokens)."""
        high = self.high_slots
        common = dict(value_group=head_dim, page_tokens=self.group, value_channel=tensors["v_channel"])
        return [dict(keys=tensors[f"k_{kind}"], values=tensors[f"v_{kind}"], bits=bits,
                     key_scale=tensors[f"k_{kind}_scale"], key_zero=tensors[f"k_{kind}_zero"],
                     value_scale=tensors["v_scale"][:, slots], value_zero=tensors["v_zero"][:, slots],
                     positions=tensors["pos"][:, slots], **common)
                for kind, bits, slots in (("high", self.bits, slice(0, high)), ("low", self.low, slice(high, None)))]

    # ---- saliency ---------------------------------------------------------------------------------------------
    def probe_indices(self, n_queries: int) -> torch.Tensor:
        """Which of `n_queries` prompt queries probe saliency: half the newest, half random (fixed seed), sorted."""
        count = min(n_queries, max(1, math.ceil(self.probe * n_queries)))
        newest = (count + 1) // 2
        older = n_queries - newest
        generator = torch.Generator().manual_seed(PROBE_SEED)
        drawn = torch.randperm(older, generator=generator)[: count - newest]
        return torch.cat([drawn, torch.arange(older, n_queries)]).sort().values

    def saliency(self, x: ScoreInputs) -> torch.Tensor:
        """Normalized attention [batch, kv_heads, tokens] (float32) of `x.keys` from the probe queries among
        `x.queries`: attention summed over probes and the GQA group, divided by the probes that see each key.
        Invalid keys score -inf."""
        picked = self.probe_indices(x.queries.shape[2]).to(x.queries.device)
        queries, query_positions = x.queries.index_select(2, picked), x.query_positions.to(x.queries.device)[picked]
        batch, q_heads, n, _ = queries.shape
        kv_heads, tokens = x.keys.shape[1], x.keys.shape[2]
        total = torch.zeros(batch, kv_heads, tokens, device=x.keys.device)
        for start in range(0, n, PROBE_BLOCK):
            block = ScoreInputs(queries[:, :, start:start + PROBE_BLOCK], query_positions[start:start + PROBE_BLOCK],
                                x.keys, x.keys, x.positions, x.valid, x.scale)
            attn = window_attention(block)
            total += attn.view(batch, kv_heads, q_heads // kv_heads, -1, tokens).sum(dim=(2, 3))
        ordered = query_positions.to(x.positions.device).sort().values.contiguous()
        seen_by = n - torch.searchsorted(ordered, x.positions.contiguous().to(ordered.dtype))
        normalized = total / (seen_by.clamp(min=1) * (q_heads // kv_heads))
        return normalized.masked_fill(~x.valid, float("-inf"))

    def order_page(self, queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
        """Slot order [rows, group] for pages packed while decoding: the `high_slots` tokens that the `queries`
        [rows, n, head_dim] attend most within the page keys [rows, group, head_dim] first, each part in place."""
        attn = torch.softmax(queries.float() @ keys.float().transpose(-1, -2) * scale, dim=-1).sum(dim=1)
        salient = top_mask(attn, torch.full((attn.shape[0],), self.high_slots))
        return torch.argsort((~salient).to(torch.int8), dim=-1, stable=True)
