"""`actqkv`: ActQKV — one probe query per head built from the observation window, weighted towards the tokens whose
activations stand out (activation bias), retrieves the keys most similar to it.

Xiao et al., "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs Inference", 2025
(arXiv:2502.13542). Averaging a window's queries blurs it into the common words; the tokens that carry the question
(names, numbers) have activations far from the window's mean. The activation bias of window token t is, over the
channels c of all query heads of the layer concatenated, mean_c (q_tc - μ_c)² / (σ²_c + mean(σ²) / 100), μ and σ²
being the window's per-channel mean and variance (the paper keeps running statistics across windows). Normalised
over the window it weights the queries into one probe per query head, p_h = Σ_t w_t q_ht. A key scores its cosine
similarity with the probe (as the paper's retrieval), averaged over the query heads of its GQA group. With the
model's RoPE known, queries and keys are compared before RoPE (`prerope=true`, as the paper's retrieval runs on
unrotated vectors), so the probe does not favour keys near the window's positions.

Not done: the paper's dynamic cut-off, which sizes each layer's retrieval by the information density (entropy) of
its scores against a running budget across layers; kvfold's layers compress independently, so the count per layer
comes from the budget (`uniform`, or per layer / per head with `@prefixkv`, `@pyramidkv`, `@adakv`). The paper
retrieves per decode step from an offloaded cache; here the probe evicts (at prefill, and with `every=` again while
decoding from the newest queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import ScoreInputs, Scorer, register
from .expected import rope


def activation_weights(queries: torch.Tensor) -> torch.Tensor:
    """queries [batch, q_heads, window, dim] -> [batch, window]: each window token's activation bias over all the
    layer's query channels, normalised to sum to 1."""
    batch, heads, window, dim = queries.shape
    flat = queries.float().permute(0, 2, 1, 3).reshape(batch, window, heads * dim)
    mean, variance = flat.mean(dim=1, keepdim=True), flat.var(dim=1, keepdim=True, unbiased=False)
    bias = ((flat - mean) ** 2 / (variance + variance.mean(dim=-1, keepdim=True) / 100 + 1e-12)).mean(dim=-1)
    total = bias.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, bias / total.clamp(min=1e-30), torch.full_like(bias, 1.0 / window))


@register("actqkv")
@dataclass(frozen=True)
class ActQKV(Scorer):
    """Keeps the keys closest (cosine) to an activation-weighted probe query of the observation window."""

    paper = "ActQKV (Xiao et al., 2025)"
    query_aware = True
    prerope: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prerope, bool):
            raise KVFoldError(f"{self.name}: prerope must be true or false, got {self.prerope!r}")

    def probe(self, x: ScoreInputs) -> torch.Tensor:
        """[batch, q_heads, dim]: the activation-weighted sum of each head's window queries."""
        queries = self._space(x.queries, x.query_positions, x)
        weights = activation_weights(queries)  # [b, w]
        return (queries * weights.view(weights.shape[0], 1, -1, 1)).sum(dim=2)

    def _space(self, vectors: torch.Tensor, positions: torch.Tensor, x: ScoreInputs) -> torch.Tensor:
        if self.prerope and x.inv_freq is not None:
            return rope(vectors, -positions, x.inv_freq)  # undo RoPE
        return vectors.float()

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        batch, q_heads, _, _ = x.queries.shape
        kv_heads = x.keys.shape[1]
        group = q_heads // kv_heads
        probe = torch.nn.functional.normalize(self.probe(x), dim=-1).view(batch, kv_heads, group, -1)
        keys = torch.nn.functional.normalize(self._space(x.keys, x.positions, x), dim=-1)  # [b, kv, n, dim]
        similarity = torch.einsum("bkgd,bknd->bkgn", probe, keys)
        return similarity.mean(dim=2)
