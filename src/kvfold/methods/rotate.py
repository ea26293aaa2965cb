"""`rotate`: an orthogonal rotation of K and V before a quantizer packs them, so that outlier channels spread
over all channels and per-token scales fit every channel well.

QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024,
arXiv:2404.00456) rotates with a randomized Hadamard matrix: `basis=hadamard` (head_dim a power of two) is
H·diag(±1)/√d with seeded random signs. `basis=random` is a seeded Haar-random orthogonal matrix (any head_dim),
as in QuaRot's ablation. A covariance-aware rotation fitted on calibration data (OSCAR) is not here yet.

Compose with any quantizer: `rotate+kivi:4`, `snapkv:0.5+rotate+fp8`. Exact up to float32 rounding: R is
orthogonal, attention reads packed keys with the query rotated by the same R (q·k = qR·kR) and turns the
output back with Rᵀ, so only the quantizer's error remains. The matrix differs per layer (seed + layer index)
and is stored once per layer (counted in `nbytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import Rotation, check_int, register

BASES = ("hadamard", "random")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), entries ±1."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@register("rotate")
@dataclass(frozen=True)
class Rotate(Rotation):
    """A randomized Hadamard (default) or random orthogonal rotation per layer, applied before quantizing."""

    paper = "QuaRot (Ashkboos et al., 2024)"
    positional = "basis"

    basis: str = "hadamard"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise KVFoldError(f"rotate: basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        check_int("rotate: seed", self.seed, 0, "seeds the random signs / matrix")

    def matrix(self, head_dim: int, layer_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer_idx)
        if self.basis == "hadamard":
            if head_dim & (head_dim - 1):
                raise KVFoldError(f"rotate: a Hadamard rotation needs head_dim a power of two, this model has "
                                  f"{head_dim}; use rotate:random")
            signs = torch.randint(0, 2, (head_dim,), generator=generator).float() * 2 - 1
            return signs.unsqueeze(1) * hadamard(head_dim) / head_dim**0.5
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: Haar-distributed
