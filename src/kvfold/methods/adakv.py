"""`adakv`: Ada-KV — one budget per layer shared out across KV heads by score, so rows become ragged and the
freed pages are really gone. `adakv:0.5` means SnapKV scores at ratio 0.5 with this budget (`snapkv:0.5@adakv`);
any scorer takes it with `@adakv`.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference"
(arXiv:2407.11550).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Budget, ScoreInputs, check_fraction, register, top_mask


@register("adakv")
@dataclass(frozen=True)
class AdaKVBudget(Budget):
    """One budget per layer (heads × per-head count), shared out by a top-k over all heads' scores.

    Each head is first guaranteed `floor` × its uniform share (AdaKV's safeguard), the rest goes to the globally
    highest scores. Scores must be comparable across heads (attention probabilities are).
    """

    paper = "Ada-KV (Feng et al., 2024)"
    floor: float = 0.2

    def __post_init__(self) -> None:
        check_fraction("adakv: floor", self.floor, "guaranteed share per head")

    def select(self, scores: torch.Tensor, keep: torch.Tensor, layer: int = 0, layers: int = 1,
               inputs: ScoreInputs | None = None) -> torch.Tensor:
        batch, heads, tokens = scores.shape
        guaranteed = torch.floor(self.floor * keep.double()).long()
        mask = top_mask(scores.reshape(batch * heads, tokens), guaranteed.repeat_interleave(heads))
        mask = mask.view(batch, heads, tokens)
        rest = scores.masked_fill(mask, float("-inf")).reshape(batch, heads * tokens)
        extra = keep * heads - guaranteed * heads
        return mask | top_mask(rest, extra).view(batch, heads, tokens)
