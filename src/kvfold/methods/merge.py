"""`merge`: LOOK-M style merging — an evicted token is folded into the kept token of its row whose key is most
similar, instead of being dropped.

Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference",
Findings of EMNLP 2024 (arXiv:2406.18139). Compose with any eviction method: `snapkv:0.75+merge`,
`h2o:0.5+merge:weighted`. Per (batch, KV head) row, each valid evicted token picks the kept token with the highest
cosine similarity of keys; every kept token then becomes the mean of itself and the tokens that picked it
(`average`, LOOK-M's averaged merging), or a mean weighted by that similarity (`weighted`: the kept token weighs
1, a merged one its similarity, clamped at 0). Keys and values merge alike; the kept token keeps its position.
Which tokens are kept, and so the bytes, are the eviction method's: merging changes only their contents.
Approximate by design (a merged key is not any real key); the tests check the arithmetic against a direct loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import Merger, register

STRATEGIES = ("average", "weighted")
BLOCK = 1024  # evicted tokens compared at once (bounds the [block, tokens] similarity matrix)


@register("merge")
@dataclass(frozen=True)
class Merge(Merger):
    """Fold evicted tokens into their most similar kept token (by key cosine similarity)."""

    paper = "LOOK-M (Wan et al., 2024)"
    positional = "strategy"

    strategy: str = "average"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise KVFoldError(f"merge: strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")

    def merge(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
              valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [batch, heads, tokens, dim]; keep, valid [batch, heads, tokens] bool. Returns keys and values
        where each kept token holds its merge (evicted and invalid tokens are returned unchanged)."""
        batch, heads, tokens, dim = keys.shape
        rows = batch * heads
        k, v = keys.reshape(rows, tokens, dim).float(), values.reshape(rows, tokens, dim).float()
        keep, donors = keep.reshape(rows, tokens), (valid & ~keep).reshape(rows, tokens)
        if not donors.any() or not keep.any():
            return keys, values
        unit = torch.nn.functional.normalize(k, dim=-1)
        target = torch.arange(tokens, device=k.device).expand(rows, tokens).clone()
        weight = keep.float()
        for start in range(0, tokens, BLOCK):
            block = slice(start, start + BLOCK)
            similarity = unit[:, block] @ unit.transpose(1, 2)  # [rows, block, tokens]
            similarity = similarity.masked_fill(~keep.unsqueeze(1), float("-inf"))
            best, index = similarity.max(dim=-1)
            giving = donors[:, block] & torch.isfinite(best)  # rows with nothing kept give nowhere
            target[:, block] = torch.where(giving, index, target[:, block])
            share = torch.ones_like(best) if self.strategy == "average" else best.clamp_min(0)
            weight[:, block] = torch.where(giving, share, weight[:, block])
        weight = torch.where(keep | donors, weight, torch.zeros_like(weight))
        total = torch.zeros(rows, tokens, device=k.device).scatter_add_(1, target, weight)
        merged = []
        for x in (k, v):
            summed = torch.zeros_like(x).scatter_add_(1, target.unsqueeze(-1).expand_as(x), x * weight.unsqueeze(-1))
            mean = summed / total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
            merged.append(torch.where(keep.unsqueeze(-1), mean, x).to(keys.dtype).view(batch, heads, tokens, dim))
        return merged[0], merged[1]
