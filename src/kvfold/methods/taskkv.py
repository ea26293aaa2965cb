"""`taskkv`: Task-KV — heads whose attention output stands apart from the layer's others keep everything; the rest
keep their attention sinks, a recent window and a few middle activations.

He et al., "Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads", 2025
(arXiv:2501.15113). Heads of a layer whose semantic vectors lie far from the layer's semantic centre
("heterogeneous" heads) carry the task-specific information and get a full budget; the others mostly repeat
common semantics and keep a small one.

kvfold's rule, per layer and batch element (a budget, so any scorer ranks the tokens: `taskkv:0.5` =
`snapkv:0.5@taskkv`, or `h2o:0.75@taskkv`):
- a KV head's semantic vector is the mean attention output, softmax(q·Kᵀ)·V, of the scorer's last `probe` queries of
  its GQA group (before the output projection, which kvfold does not see); its distance is the L2 distance to the
  mean vector of the layer's heads;
- every head first gets its light share: `light` × the uniform count (never below the scorer's protected `sink` +
  `window`), filled by its highest scores — the paper's sinks, recent window and middle activations;
- the rest of the layer's budget (heads × uniform count, the same total as `uniform`) goes to heads in order of
  distance, each up to its whole row, so the farthest heads keep everything and rows become ragged.
The paper finds heterogeneous heads with a separator fitted offline per task; here they are ranked per input from
the same prompt the scorer reads, so no calibration is needed and a fixed ratio holds exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import PROTECTED, Budget, ScoreInputs, check_fraction, check_int, probe_attention, register, top_mask


def semantic_distance(inputs: ScoreInputs, probe: int) -> torch.Tensor:
    """[batch, kv_heads]: L2 distance of each KV head's mean attention output (its GQA group's last `probe`
    queries) from the mean over the layer's KV heads."""
    attn = probe_attention(inputs, probe)  # [batch, kv_heads, group * probe, tokens]
    values = inputs.values.float().masked_fill(~inputs.valid.unsqueeze(-1), 0.0)
    semantic = torch.matmul(attn, values).mean(dim=2)  # [batch, kv_heads, head_dim]
    return (semantic - semantic.mean(dim=1, keepdim=True)).norm(dim=-1)


@register("taskkv")
@dataclass(frozen=True)
class TaskKVBudget(Budget):
    """Light share for every KV head, the rest of the layer's budget to the heads farthest from the semantic centre."""

    paper = "Task-KV (He et al., 2025)"
    light: float = 0.2
    probe: int = 8

    def __post_init__(self) -> None:
        check_fraction("taskkv: light", self.light, "share of the uniform count every head keeps")
        check_int("taskkv: probe", self.probe, 1, "newest scorer queries whose attention output ranks the heads")

    def counts(self, scores: torch.Tensor, keep: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """Tokens per row [batch, kv_heads]: light shares, then the spare budget in order of `distance`."""
        batch, heads, _ = scores.shape
        held = torch.isfinite(scores).sum(dim=-1).cpu()
        protected = (scores >= PROTECTED).sum(dim=-1).cpu()
        keep = keep.cpu().long().view(batch, 1)
        light = torch.ceil(self.light * keep.double()).long().expand(batch, heads)
        counts = torch.minimum(torch.maximum(light, torch.minimum(protected, keep)), held)
        spare = (keep.view(batch) * heads - counts.sum(dim=-1)).clamp(min=0)
        order = distance.cpu().argsort(dim=-1, descending=True, stable=True)
        for b in range(batch):
            for head in order[b].tolist():
                give = min(int(spare[b]), int(held[b, head] - counts[b, head]))
                counts[b, head] += give
                spare[b] -= give
        return counts

    def select(self, scores: torch.Tensor, keep: torch.Tensor, layer: int = 0, layers: int = 1,
               inputs: ScoreInputs | None = None) -> torch.Tensor:
        if inputs is None:
            raise KVFoldError("taskkv ranks heads by their attention outputs: select() needs the scorer's inputs")
        batch, heads, tokens = scores.shape
        counts = self.counts(scores, keep, semantic_distance(inputs, self.probe))
        return top_mask(scores.reshape(batch * heads, tokens), counts.flatten()).view(batch, heads, tokens)
