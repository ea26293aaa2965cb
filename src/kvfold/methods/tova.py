"""`tova`: Token Omission Via Attention — the newest query's attention decides which tokens stay.

Oren, Hassid, Yarden, Adi and Schwartz, "Transformers are Multi-State RNNs", 2024 (arXiv:2401.06104).
TOVA treats the cache as a bounded multi-state: at every decoding step, once the cache is over its limit, it drops
the tokens the current query attends to least. The score of a key is the softmax attention of the newest query
only (a window of one query for scoring), averaged over the layer's query heads so every KV head keeps the same
tokens — the paper's layer-wise policy (its reference code, `TOVACache.reduce`, takes the mean over all heads).
`per_head=true` scores each KV head by its own GQA group instead.

It is a decode-time method: `every=1` re-applies the budget after every decoded token (the fixed multi-state size
of the paper is `budget=N`; a `ratio` keeps that fraction of the tokens seen so far). At prefill it is query-aware:
the last prompt token's query scores the prompt. The paper protects no token (the newest one, attended by its own
query, is rarely dropped); kvfold's default `window=1` always keeps the newest token, as kvpress's TOVA does;
`window=0` is the paper's exact rule. A larger `window` protects more recent tokens but scoring still reads the
newest query only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import ScoreInputs, Scorer, register, window_attention


def last_query_attention(x: ScoreInputs) -> torch.Tensor:
    """Softmax attention of the newest query over the keys: [batch, kv_heads, group, tokens] in float32."""
    batch, q_heads, _, _ = x.queries.shape
    kv_heads, tokens = x.keys.shape[1], x.keys.shape[2]
    newest = replace(x, queries=x.queries[:, :, -1:], query_positions=x.query_positions[-1:])
    return window_attention(newest).view(batch, kv_heads, q_heads // kv_heads, tokens)


@register("tova")
@dataclass(frozen=True)
class TOVA(Scorer):
    """Keeps the tokens the newest query attends to most (mean over the layer's heads), re-applied every step."""

    paper = "TOVA (Oren et al., 2024)"
    query_aware = True
    attention_mass = True
    window: int = 1
    every: int = 1
    per_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.per_head, bool):
            from ..errors import KVFoldError

            raise KVFoldError(f"tova: per_head must be true or false, got {self.per_head!r}")

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        attn = last_query_attention(x)
        batch, kv_heads, group, tokens = attn.shape
        if self.per_head:
            return attn.mean(dim=2)
        # One score per token for the whole layer. Rows may hold different tokens (after a ragged budget such as
        # adakv), so the heads' attention is summed per sequence position, not per slot; a token a head no longer
        # holds counts as zero attention from that head.
        per_row = attn.sum(dim=2).reshape(batch, kv_heads * tokens)
        index = x.positions.masked_fill(~x.valid, 0).reshape(batch, kv_heads * tokens)
        width = int(index.max()) + 1 if index.numel() else 1
        by_position = torch.zeros(batch, width, dtype=per_row.dtype, device=per_row.device)
        by_position.scatter_add_(1, index, per_row)
        return by_position.gather(1, index).view(batch, kv_heads, tokens) / (kv_heads * group)
