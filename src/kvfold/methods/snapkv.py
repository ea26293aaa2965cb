"""`snapkv`: SnapKV — the last `window` queries vote for the keys they attend to, smoothed by pooling.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024 (arXiv:2404.14469).
Per KV head the score of a key is the attention it receives from the observation window (softmax over all keys,
causal inside the window), averaged over the window queries and over the query heads of the GQA group, then
average-pooled along the tokens (kernel `kernel`). The window itself is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ScoreInputs, Scorer, check_int, register, window_attention


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(Scorer):
    """Keeps the keys the observation window attends to most (query-aware when the question is in the window)."""

    paper = "SnapKV (Li et al., 2024)"
    query_aware = True
    attention_mass = True
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(f"{self.name}: kernel", self.kernel, 1, "pooling width along tokens, odd")
        if self.kernel % 2 == 0:
            from ..errors import KVFoldError

            raise KVFoldError(f"{self.name}: kernel must be odd, got {self.kernel}")

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        attn = window_attention(x)
        batch, q_heads, window, tokens = attn.shape
        kv_heads = x.keys.shape[1]
        votes = attn.view(batch, kv_heads, q_heads // kv_heads, window, tokens).mean(dim=(2, 3))
        if self.kernel > 1:
            votes = F.avg_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        return votes
