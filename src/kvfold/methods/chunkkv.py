"""`chunkkv`: ChunkKV — keep or drop whole spans of tokens, not single tokens.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference", 2025
(arXiv:2502.00299). Token-level eviction scores each key on its own, so a fact the answer needs can lose some of
its tokens (a 7-digit number whose middle digits drew little attention). ChunkKV cuts the context into chunks of
`chunk` consecutive tokens (10 in the paper), scores each chunk by the attention its tokens receive from the
observation window, and keeps the highest-scoring chunks whole.

`chunkkv` is `snapkv` with `chunk=10`: SnapKV's window votes (pooled), then every span of `chunk` positions shares
the mean vote of its tokens (:func:`kvfold.methods.base.chunk_mean`; for full chunks the same ranking as the paper's
sum). The `chunk` knob works on every scorer (`knorm:0.5,chunk=8`, `h2o:0.75,chunk=16@adakv`). Budgets count
tokens, not chunks, so the lowest-ranked chunk a budget reaches may be cut (its earliest tokens kept). The paper's
layer-wise index reuse (sharing one layer's selection with the next) is not done: every layer selects its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .snapkv import SnapKV


@register("chunkkv")
@dataclass(frozen=True)
class ChunkKV(SnapKV):
    """SnapKV's observation-window votes, ranked by spans of `chunk` positions (query-aware)."""

    paper = "ChunkKV (Liu et al., 2025)"
    chunk: int = 10
