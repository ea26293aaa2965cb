"""`prefixkv`: PrefixKV — per-layer budgets from one global threshold on cumulative importance, found by binary
search, so that layers whose attention sits on a few keys give tokens to layers whose attention is spread.

Wang et al., "PrefixKV: Adaptive Prefix KV Cache is What Vision Instruction-Following Models Need for Efficient
Generation", NeurIPS 2025 (arXiv:2412.03409). Each layer ranks its keys by importance; the prefix of the ranking
that holds a share p of the layer's importance is what that layer keeps. One p for all layers (the "global prefix
configuration") is searched so that the kept fractions average to the budget. The paper estimates the per-layer
fractions offline on a few samples and reuses them; here the offline part is the profile that `kvfold inspect`
writes: per layer, the importance curve C_l(x) = share of the layer's attention mass (mean over heads, summed over
all queries, as the paper's accumulated scores) held by its top x of keys. At run time, for the layer's kept
fraction r = keep / valid, bisection finds p with mean_l f_l(p) = r, f_l(p) = the least x with C_l(x) >= p (linear
between the curve's samples). Layer l then keeps the protected tokens plus share · f_l(p) / r of the tokens beyond
them (share = the uniform count beyond the protected span), so the mean over layers is the uniform count (within
rounding; a layer never keeps more than it holds, and what a full layer cannot take is not moved elsewhere). Each
KV head of a layer keeps the same count, its best-scored tokens (any scorer: `snapkv:0.5@prefixkv:profile=DIR`).
The profile comes from one input, not the paper's few samples; a profile of another model is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import PerLayerBudget, register

SEARCH_STEPS = 50


def inverse_curves(curves: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """curves [layers, points] (non-decreasing, kept fractions evenly from 0 to 1), p [rows] -> [rows, layers]: the
    least kept fraction at which each layer's curve reaches p, interpolated linearly between samples."""
    points = curves.shape[-1]
    expanded = curves.unsqueeze(0).expand(p.shape[0], -1, -1).contiguous()
    target = p.view(-1, 1, 1).expand(-1, curves.shape[0], 1).contiguous()
    upper = torch.searchsorted(expanded, target).squeeze(-1).clamp(max=points - 1)  # first sample >= p
    lower = (upper - 1).clamp(min=0)
    c_low, c_high = expanded.gather(-1, lower.unsqueeze(-1)).squeeze(-1), expanded.gather(-1, upper.unsqueeze(-1)).squeeze(-1)
    step = 1.0 / (points - 1)
    part = ((p.view(-1, 1) - c_low) / (c_high - c_low).clamp(min=1e-12)).clamp(0, 1)
    return torch.where(upper == 0, torch.zeros_like(c_low), (lower + part) * step)


def layer_fractions(curves: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[rows, layers]: the per-layer kept fractions f_l(p) whose mean over layers is `kept` [rows] (each in (0, 1]),
    p found by bisection. Where even p = 1 keeps less on average than asked, every layer keeps `kept`."""
    low, high = torch.zeros_like(kept), torch.ones_like(kept)
    for _ in range(SEARCH_STEPS):
        mid = (low + high) / 2
        enough = inverse_curves(curves, mid).mean(-1) >= kept
        high, low = torch.where(enough, mid, high), torch.where(enough, low, mid)
    fractions = inverse_curves(curves, high)
    reachable = fractions.mean(-1, keepdim=True) >= kept.unsqueeze(-1) - 1e-9
    return torch.where(reachable, fractions, kept.unsqueeze(-1).expand_as(fractions))


@register("prefixkv")
@dataclass(frozen=True)
class PrefixKVBudget(PerLayerBudget):
    """Per-layer counts from one cumulative-importance threshold over the profile's layer curves, same total."""

    paper = "PrefixKV (Wang et al., 2025)"
    profile: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.profile, str) or not self.profile:
            raise KVFoldError("prefixkv needs profile=PATH: a profile.json (or its folder) written by "
                              "`kvfold inspect --out DIR` for this model")
        from ..inspection.profile import load_profile

        profile = load_profile(self.profile)
        curves = [layer.get("importance_curve") for layer in profile["layers"]]
        if any(curve is None for curve in curves):
            raise KVFoldError(f"profile '{self.profile}' has no importance curves (written by an older kvfold): run "
                              "`kvfold inspect` again")
        if len({len(curve) for curve in curves}) != 1:
            raise KVFoldError(f"profile '{self.profile}': the layers' importance curves differ in length")
        tensor = torch.tensor(curves, dtype=torch.float64)
        tensor = torch.cummax(tensor.clamp(0, 1), dim=-1).values  # rounding in the JSON must not break monotony
        object.__setattr__(self, "_model", profile["model"])
        object.__setattr__(self, "_curves", tensor)
        object.__setattr__(self, "_last_search", {})  # kept fractions -> layer_fractions (one entry)

    def curves(self) -> torch.Tensor:
        """[layers, points] the profile's importance curves."""
        return self._curves

    def check_model(self, config) -> None:
        from ..inspection.profile import check_profile_model

        check_profile_model(self._model, config, self.profile)

    def layer_share(self, share: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, layer: int,
                    layers: int) -> torch.Tensor:
        if layers != self._curves.shape[0]:
            raise KVFoldError(f"prefixkv: the profile is for {self._model['layers']} layers ({self._model['name']}), "
                              f"this model has {layers}: run `kvfold inspect` for this model")
        kept = (keep.double() / valid.clamp(min=1).double()).clamp(1e-9, 1.0)
        distinct, row = torch.unique(kept.flatten().cpu(), return_inverse=True)
        fractions = self._search(tuple(distinct.tolist()))[row, layer].view_as(kept).to(share.device)
        return share * fractions / kept

    def _search(self, kept: tuple[float, ...]) -> torch.Tensor:
        """`layer_fractions` of these kept fractions; every layer of a pass asks the same, so the bisection runs
        once per pass rather than once per layer (the last answer is kept, nothing more)."""
        if kept not in self._last_search:
            self._last_search.clear()
            self._last_search[kept] = layer_fractions(self._curves, torch.tensor(kept, dtype=torch.float64))
        return self._last_search[kept]
