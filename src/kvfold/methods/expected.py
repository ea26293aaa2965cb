"""`expected`: Expected Attention — score each key by the attention that *future* queries are expected to give it,
estimated in closed form from the statistics of recent queries.

Devoto, Jeblick and Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution", 2025 (arXiv:2510.00636).
The `window` newest queries are rotated back to pre-RoPE space (RoPE is a rotation by position), where they are
modelled as Gaussian: mean μ and covariance Σ per query head. A query at future position T + Δ is R(T + Δ)·q, so
over the next `future` positions its distribution has mean M·μ and covariance M·Σ·Mᵀ, M being the rotation
averaged over those positions. For a Gaussian q, E[exp(s·q·k)] = exp(s·μ'·k + s²·kᵀΣ'k / 2); normalised over the
keys this is the expected attention probability, multiplied by ‖v‖ (a key's effect on the output scales with its
value) and averaged over the query heads of the GQA group. Approximate: a Gaussian model of queries and one
averaged rotation instead of the average over each future position (as the paper's implementation does); the
tests compare the ranking with a Monte Carlo estimate of the attention of sampled future queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import ScoreInputs, Scorer, check_int, register


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x·cos + rotate_half(x)·sin` on the first 2·len(cos) channels (transformers' RoPE layout, halves paired);
    cos/sin [..., rotary_dim / 2] broadcast over x [..., head_dim]. With cos/sin of an angle this is RoPE's
    rotation by that angle; with averaged cos/sin it is the averaged (linear, not orthogonal) map."""
    half = cos.shape[-1]
    head, tail = x[..., : 2 * half], x[..., 2 * half:]
    first, second = head[..., :half], head[..., half:]
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return torch.cat([rotated, tail], dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., n, dim] rotated by RoPE at `positions` (broadcasting to [..., n]), as float32; `-positions` undoes
    the rotation, turning cached (RoPE'd) keys and queries back into pre-RoPE vectors."""
    angles = positions.to(x.device).double().unsqueeze(-1) * inv_freq.double().to(x.device)
    return rotate(x.float(), angles.cos().float(), angles.sin().float())


@register("expected")
@dataclass(frozen=True)
class ExpectedAttention(Scorer):
    """Keeps the keys that queries of the next `future` positions are expected to attend to (query-agnostic)."""

    paper = "Expected Attention (Devoto et al., 2025)"
    needs_rope = True
    sink: int = 4
    future: int = 512
    covariance: bool = True
    vnorm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(f"{self.name}: future", self.future, 1, "future positions the query statistics are rotated to")
        for knob in ("covariance", "vnorm"):
            if not isinstance(getattr(self, knob), bool):
                raise KVFoldError(f"{self.name}: {knob} must be true or false, got {getattr(self, knob)!r}")

    def future_map(self, x: ScoreInputs) -> torch.Tensor:
        """A [head_dim, head_dim] with row vectors mapped as `q_pre @ A` = the rotation averaged over positions
        last + 1 .. last + future."""
        last = int(x.query_positions.max())
        offsets = torch.arange(last + 1, last + 1 + self.future, dtype=torch.float64)
        angles = offsets.unsqueeze(1) * x.inv_freq.double().cpu().unsqueeze(0)  # [future, rotary_dim / 2]
        cos, sin = angles.cos().mean(0).float(), angles.sin().mean(0).float()
        dim = x.queries.shape[-1]
        return rotate(torch.eye(dim), cos, sin).to(x.queries.device)

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        if x.inv_freq is None:
            raise KVFoldError("expected needs the model's RoPE frequencies (from its config's rope_parameters); "
                              "this model has none kvfold understands: pick another scorer, e.g. snapkv or knorm")
        batch, q_heads, window, dim = x.queries.shape
        kv_heads, tokens = x.keys.shape[1], x.keys.shape[2]
        group = q_heads // kv_heads
        pre = rope(x.queries, -x.query_positions, x.inv_freq)  # undo RoPE
        mean = pre.mean(dim=2)  # [batch, q_heads, dim]
        future = self.future_map(x)
        mean = mean @ future
        keys = x.keys.float().repeat_interleave(group, dim=1)  # [batch, q_heads, tokens, dim]
        logits = x.scale * (keys @ mean.unsqueeze(-1)).squeeze(-1)
        if self.covariance and window > 1:
            centred = pre - pre.mean(dim=2, keepdim=True)
            cov = centred.transpose(-1, -2) @ centred / (window - 1)  # [batch, q_heads, dim, dim]
            cov = future.T @ cov @ future
            logits = logits + 0.5 * x.scale**2 * ((keys @ cov) * keys).sum(-1)
        valid = x.valid.repeat_interleave(group, dim=1)
        probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
        if self.vnorm:
            probs = probs * x.values.float().norm(dim=-1).repeat_interleave(group, dim=1)
        return probs.view(batch, kv_heads, group, tokens).mean(dim=2)
