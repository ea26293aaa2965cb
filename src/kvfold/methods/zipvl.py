"""`zipvl`: ZipVL-style dynamic ratio — each row keeps the smallest set of tokens whose attention mass reaches a
threshold, so how much is kept adapts to the input and the layer instead of being fixed.

He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and KV Cache
Compression" (arXiv:2410.08584). The paper sets one layer-wise count from the attention's cumulative mass; kvfold
applies the rule per row (batch element, KV head), since its rows may hold different numbers of tokens, so every
head keeps exactly the mass it needs. The scorer's ratio and token budget are not used; protected tokens (`sink`,
`window`) are kept besides. Only scorers whose scores are attention probabilities qualify (snapkv, h2o, tova).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import PROTECTED, Budget, ScoreInputs, check_fraction, register, top_mask


@register("zipvl")
@dataclass(frozen=True)
class ZipVLBudget(Budget):
    """Per row, the fewest highest-scoring tokens whose share of the row's attention mass reaches `threshold`."""

    paper = "ZipVL (He et al., 2024)"
    needs_attention_mass: ClassVar[bool] = True
    threshold: float = 0.95

    def __post_init__(self) -> None:
        check_fraction("zipvl: threshold", self.threshold, "the attention mass kept", low_open=True)

    def select(self, scores: torch.Tensor, keep: torch.Tensor, layer: int = 0, layers: int = 1,
               inputs: ScoreInputs | None = None) -> torch.Tensor:
        protected = scores >= PROTECTED
        candidate = torch.isfinite(scores) & ~protected
        mass = scores.double().clamp_min(0).masked_fill(~candidate, 0.0)
        total = mass.sum(dim=-1)
        cumulative = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
        needed = (cumulative < self.threshold * total.unsqueeze(-1)).sum(dim=-1) + 1
        counts = torch.where(total > 0, torch.minimum(needed, candidate.sum(dim=-1)), torch.zeros_like(needed))
        tokens = scores.shape[-1]
        kept = top_mask(mass.reshape(-1, tokens), counts.reshape(-1)).view_as(scores) & candidate
        return kept | protected
