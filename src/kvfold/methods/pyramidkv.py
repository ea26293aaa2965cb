"""`pyramidkv`: PyramidKV — more tokens in the lower layers, fewer in the upper ones, the same total.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (arXiv:2406.02069).
Attention is spread wide in the lower layers and funnels onto a few tokens in the upper ones, so the per-layer
token counts follow an arithmetic sequence that decreases with depth and averages to the uniform count. Like
`adakv` this is a budget: `pyramidkv:0.75` means SnapKV scores at ratio 0.75 with this budget
(`snapkv:0.75@pyramidkv`, the paper's pairing); any scorer takes it with `@pyramidkv`.

The rule (the paper's, as in its reference code `PyramidKVCluster`): the protected tokens (`window` + `sink`,
kept in every layer) are set aside; of the remaining uniform share `s = keep - protected`, the top layer keeps
`s / beta` and the bottom layer `2 s - s / beta`, the layers between on the straight line joining them, so the
mean over the layers is `s`. `beta` >= 1 sets the slope (1 = uniform; the paper's default is 20). Each layer's
count is rounded to a whole token (so the mean over layers is the uniform count within 0.5 token per layer), never
below one token, and is the same for every KV head of the layer (a `top_mask` per head, like `uniform`).

Where a layer's count exceeds the tokens it holds it keeps them all. The paper's code then moves the surplus up the
pyramid (it lowers the bottom to the context length and raises the top); that needs the context length, which a
layer cannot know in a chunked prefill or a decode-time re-compression (each layer then holds a different number
of tokens), so kvfold keeps the plain clamp: the total never exceeds the uniform budget, and the mean is the
uniform count whenever the bottom layer's count fits in what it holds — with beta=20, for every ratio of 0.49 or
more. Below that the lowest layers keep everything and the cache ends up smaller than the ratio asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import PerLayerBudget, register


def pyramid_share(share: torch.Tensor, layer: int, layers: int, beta: float) -> torch.Tensor:
    """Tokens layer `layer` of `layers` keeps out of a uniform share `share` (float, before rounding)."""
    if layers <= 1:
        return share.double()
    share = share.double()
    bottom, top = 2 * share - share / beta, share / beta
    return bottom - (bottom - top) * (layer / (layers - 1))


@register("pyramidkv")
@dataclass(frozen=True)
class PyramidKVBudget(PerLayerBudget):
    """Per-layer token counts decreasing linearly with depth (bottom ≈ 2x, top 1/beta of the share), same total."""

    paper = "PyramidKV (Cai et al., 2024)"
    beta: float = 20

    def __post_init__(self) -> None:
        beta = self.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 1:
            raise KVFoldError(f"pyramidkv: beta must be a number >= 1 (the top layer keeps 1/beta of the average "
                              f"share, the bottom layer 2 - 1/beta of it; 1 = uniform), got {beta!r}")

    def layer_share(self, share: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, layer: int,
                    layers: int) -> torch.Tensor:
        return pyramid_share(share, layer, layers, float(self.beta))
