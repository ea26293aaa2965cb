"""`rotate`: an orthogonal rotation of K and V before a quantizer packs them, so that outlier channels spread
over all channels and per-token scales fit every channel well.

QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024,
arXiv:2404.00456) rotates with a randomized Hadamard matrix: `basis=hadamard` (head_dim a power of two) is
H·diag(±1)/√d with seeded random signs. `basis=random` is a seeded Haar-random orthogonal matrix (any head_dim),
as in QuaRot's ablation. `basis=oscar,calib=FILE` is OSCAR's covariance-aware rotation ("OSCAR", arXiv:2605.17757),
fitted per layer by `kvfold calibrate` (`kvfold.calibration`): keys turn by the eigenvectors of the queries'
second moment (the metric in which key errors reach the logits), values by those of the attention-weighted values'
second moment, each followed by a bit-reversal order and a Hadamard; each rotated row is then clipped at its
fitted quantile of |x| (`clip=false` turns that off), as OSCAR's kernels do before 2-bit packing. Clipping is
the one lossy step a rotation adds: it makes the quantizer's grid finer for the price of the clipped tails.

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

BASES = ("hadamard", "random", "oscar")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), entries ±1."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def clip_rows(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Clamp each row of x [..., d] to ± its `ratio` quantile of |x| (OSCAR's per-row clip: the value at sorted
    index int(ratio * d)); ratio 1 leaves rows as they are."""
    if ratio >= 1:
        return x
    d = x.shape[-1]
    index = min(d - 1, int(ratio * d))
    threshold = x.abs().sort(dim=-1).values[..., index:index + 1]
    return torch.maximum(torch.minimum(x, threshold), -threshold)


@register("rotate")
@dataclass(frozen=True)
class Rotate(Rotation):
    """A randomized Hadamard (default) or random orthogonal rotation per layer, applied before quantizing."""

    paper = "QuaRot (Ashkboos et al., 2024)"
    positional = "basis"

    basis: str = "hadamard"
    seed: int = 0
    calib: str = ""
    clip: bool = True

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise KVFoldError(f"rotate: basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        check_int("rotate: seed", self.seed, 0, "seeds the random signs / matrix")
        if not isinstance(self.clip, bool):
            raise KVFoldError(f"rotate: clip must be true or false, got {self.clip!r}")
        if (self.basis == "oscar") != bool(self.calib):
            raise KVFoldError("rotate:oscar needs calib=FILE, written by `kvfold calibrate --method rotate:oscar "
                              "--out FILE`" if self.basis == "oscar" else
                              f"rotate: calib= is read by basis=oscar only, not {self.basis}")
        if self.calib:
            from ..calibration import load_calibration

            tensors, metadata = load_calibration(self.calib)
            object.__setattr__(self, "_fitted", (tensors, metadata["model"]))

    def check_model(self, config) -> None:
        if self.basis != "oscar":
            return
        from ..inspection.profile import check_model_identity

        check_model_identity(self._fitted[1], config, f"rotate:oscar: calibration '{self.calib}' was fitted on",
                             "kvfold calibrate --method rotate:oscar --model M")

    def matrices(self, head_dim: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.basis != "oscar":
            return super().matrices(head_dim, layer_idx)
        tensors = self._fitted[0]
        key, value = tensors[f"layers.{layer_idx}.key_rotation"], tensors[f"layers.{layer_idx}.value_rotation"]
        if key.shape != (head_dim, head_dim):
            raise KVFoldError(f"rotate:oscar: calibration '{self.calib}' has {tuple(key.shape)} rotations, this "
                              f"model's head_dim is {head_dim}")
        return key, value

    def clip_ratios(self, layer_idx: int) -> tuple[float, float]:
        if self.basis != "oscar" or not self.clip:
            return 1.0, 1.0
        tensors = self._fitted[0]
        return float(tensors["key_clip"][layer_idx]), float(tensors["value_clip"][layer_idx])

    def matrix(self, head_dim: int, layer_idx: int) -> torch.Tensor:
        if self.basis == "oscar":
            return self.matrices(head_dim, layer_idx)[0]
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
