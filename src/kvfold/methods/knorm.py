"""`knorm`: keep the keys with the smallest L2 norm — query-agnostic, no attention needed.

Devoto, Zhao, Scardapane and Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024 (arXiv:2406.11430). The paper observes that a key with a low L2 norm tends to receive high attention
later, so each KV head keeps its lowest-norm keys (with their values) and evicts the rest. The score is
`-||k||` of the cached key (RoPE applied, as stored); no query is read, so the same context compresses the same way
whatever question follows.

kvfold's protected span (`window` newest tokens, `sink` first ones) applies as for every scorer; the paper protects
nothing, so `knorm:0.5,window=0` is its exact rule. (The paper's reference code can also leave chosen layers
uncompressed; kvfold compresses every layer.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreInputs, Scorer, register


@register("knorm")
@dataclass(frozen=True)
class KNorm(Scorer):
    """Keeps the keys with the smallest L2 norm in each KV head (query-agnostic)."""

    paper = "K-norm (Devoto et al., 2024)"
    query_aware = False

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        return -x.keys.float().norm(dim=-1)
