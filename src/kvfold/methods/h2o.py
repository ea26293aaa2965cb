"""`h2o`: Heavy-Hitter Oracle — keep the keys that have received the most attention so far, plus recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023 (arXiv:2306.14048). A key's score is its accumulated attention: the sum, over every query that could
see it (causal), of the softmax attention that query gave it. Heavy hitters are the highest-scoring keys; the
`window` newest tokens are the paper's "recent" part and are always kept (by kvfold's protected span). H2O scores
per head; with grouped-query attention the query heads of each KV head's group are averaged.

At prefill the score reads every prompt query (`observes_all`), accumulated `QUERY_CHUNK` queries at a time with an
exact causal softmax per query, so the full [query heads, n, n] attention is never materialised (a chunk holds
[query heads, QUERY_CHUNK, n]). In a chunked prefill (`prefill_chunk=N`) each chunk re-scores the stored tokens
with that chunk's queries only.

Decode time (`every=N`) differs from the paper: the paper keeps a running per-token accumulator and adds each new
query's attention to it; kvfold re-scores the stored tokens with the recent `window` queries the cache keeps for
decode-time compression (their summed attention). A running accumulator would be one more number per stored token
that has to follow the token through eviction, compaction, forks and packing — a stored page field the cache's
pages do not have (see `pages.Field`); the recent-query re-score needs nothing stored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .base import ScoreInputs, Scorer, register, window_attention

QUERY_CHUNK = 256  # queries per step of the accumulation


def accumulated_attention(x: ScoreInputs, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """Causal softmax attention each key receives, summed over the queries of `x` and averaged over the query heads
    of its GQA group: [batch, kv_heads, tokens] in float32. A query sees the valid keys at or before its position.

    Each chunk of queries is scored only against the key slots up to the last one any of them can see
    (`window_attention`'s `keys_end`; prompt keys are stored in position order, so about half the work of the whole
    [n, n] product): the same numbers, about twice as fast at 6k tokens on a CPU.
    """
    batch, q_heads, n_queries, _ = x.queries.shape
    kv_heads, tokens = x.keys.shape[1], x.keys.shape[2]
    x = replace(x, keys=x.keys.float(), query_positions=x.query_positions.to(x.positions.device))  # once, not per chunk
    total = torch.zeros(batch, kv_heads, tokens, dtype=torch.float32, device=x.keys.device)
    for start in range(0, n_queries, chunk):
        seen = x.query_positions[start:start + chunk]
        reachable = (x.valid & (x.positions <= seen.max())).flatten(0, 1).any(dim=0).nonzero()
        if not len(reachable):
            continue
        end = int(reachable[-1]) + 1
        attn = window_attention(replace(x, queries=x.queries[:, :, start:start + chunk], query_positions=seen), end)
        total[..., :end] += attn.sum(dim=2).view(batch, kv_heads, q_heads // kv_heads, end).mean(dim=2)
    return total


@register("h2o")
@dataclass(frozen=True)
class H2O(Scorer):
    """Keeps the heavy hitters (most accumulated attention from all prompt queries) and the `window` newest tokens."""

    paper = "H2O (Zhang et al., 2023)"
    query_aware = True
    attention_mass = True
    observes_all: ClassVar[bool] = True

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        return accumulated_attention(x)
