"""`triattention`: TriAttention — score each key by the attention that the *centre* of the queries would pay it at
future distances, a trigonometric series in the distance, plus a Q/K-norm term.

Mao et al., "TriAttention: Efficient Long Reasoning with Trigonometric KV Compression", 2026 (arXiv:2604.04921).
In pre-RoPE space queries concentrate around a fixed centre. Pair channel f with f + rotary_dim/2 into a complex
number (transformers' RoPE layout): RoPE multiplies it by e^{iω_f·pos}, so a query at position t and a key at j give
q·k = Σ_f |q_f||k_f| cos(ω_f (t - j) + arg(q_f k̄_f)). With the mean query q̄ in place of q this is the series
S(Δ) = Σ_f A_f cos(ω_f Δ + φ_f), A_f = |q̄_f||k_f|, φ_f = arg(q̄_f k̄_f): the distances the head prefers for this key.
The norm term Σ_f (E|q_f| - |q̄_f|)·|k_f| adds what the spread of the queries around their centre can still give a
key of large norm (`norm=false` drops it). Channels past the rotary dimensions add E[q]·k (no position).
A key at position j is scored by S at Δ = t - j for the future query positions t = last + o, o in 1, 2, 4, ... up to
`future`, averaged over those offsets (`pool=max`: their maximum), then over the query heads of its GQA group.

Differences from the paper: the query centre and E|q| come from the observation window's queries (RoPE undone),
not from an offline calibration set, and the per-frequency weights the paper calibrates are all 1. Designed for
decode-time compression of long generations: use it with `every=` (e.g. `triattention:0.5,every=128`); at prefill it
is query-agnostic (it reads the window's statistics, not their attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import ScoreInputs, Scorer, check_int, register
from .expected import rope

POOLS = ("mean", "max")


def future_offsets(future: int) -> torch.Tensor:
    """1, 2, 4, ... up to `future` (float64): the future query distances past the newest window query."""
    offsets = [1]
    while offsets[-1] * 2 <= future:
        offsets.append(offsets[-1] * 2)
    return torch.tensor(offsets, dtype=torch.float64)


def as_complex(x: torch.Tensor, half: int) -> torch.Tensor:
    """The first 2·half channels of x [..., dim] as `half` complex numbers (channel f pairs with f + half)."""
    return torch.complex(x[..., :half].double(), x[..., half:2 * half].double())


@register("triattention")
@dataclass(frozen=True)
class TriAttention(Scorer):
    """Keeps the keys the query centre prefers at future distances (trigonometric series) plus a norm term."""

    paper = "TriAttention (Mao et al., 2026)"
    needs_rope = True
    future: int = 1024
    pool: str = "mean"
    norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(f"{self.name}: future", self.future, 1, "the farthest future query distance scored")
        if self.pool not in POOLS:
            raise KVFoldError(f"{self.name}: pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not isinstance(self.norm, bool):
            raise KVFoldError(f"{self.name}: norm must be true or false, got {self.norm!r}")

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        if x.inv_freq is None:
            raise KVFoldError("triattention needs the model's RoPE frequencies (from its config's rope_parameters); "
                              "this model has none kvfold understands: pick another scorer, e.g. snapkv or knorm")
        batch, q_heads, _, dim = x.queries.shape
        kv_heads, tokens = x.keys.shape[1], x.keys.shape[2]
        group, half = q_heads // kv_heads, x.inv_freq.shape[-1]
        queries = rope(x.queries, -x.query_positions, x.inv_freq)  # pre-RoPE [b, qh, w, dim]
        keys = rope(x.keys, -x.positions, x.inv_freq).repeat_interleave(group, dim=1)  # [b, qh, n, dim]
        q_complex, k_complex = as_complex(queries, half), as_complex(keys, half)
        centre = q_complex.mean(dim=2)  # [b, qh, half]
        relative = centre.unsqueeze(2) * k_complex.conj()  # [b, qh, n, half]: amplitude A_f, phase φ_f
        newest = x.query_positions.max().to(x.keys.device)
        offsets = future_offsets(self.future).to(x.keys.device)
        distance = (newest - x.positions).double().repeat_interleave(group, dim=1).unsqueeze(-1) + offsets
        omega = x.inv_freq.double().to(x.keys.device)
        phase = distance.unsqueeze(-1) * omega + relative.angle().unsqueeze(-2)  # [b, qh, n, offsets, half]
        series = (relative.abs().unsqueeze(-2) * phase.cos()).sum(-1)  # [b, qh, n, offsets]
        series = series.mean(-1) if self.pool == "mean" else series.amax(-1)
        if 2 * half < dim:  # channels RoPE leaves alone: the centre's plain dot product
            series = series + (keys[..., 2 * half:].double() * queries[..., 2 * half:].double().mean(2, keepdim=True)).sum(-1)
        if self.norm:
            spread = q_complex.abs().mean(dim=2) - centre.abs()  # [b, qh, half], >= 0
            series = series + (k_complex.abs() * spread.unsqueeze(2)).sum(-1)
        return series.view(batch, kv_heads, group, tokens).mean(dim=2)
