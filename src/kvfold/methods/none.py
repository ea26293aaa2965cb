"""`none`: keep every token in full precision. The baseline every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreInputs, Scorer, register


@register("none")
@dataclass(frozen=True)
class NoCompression(Scorer):
    """Keeps everything (padding is still dropped, so batched rows hold only their real tokens)."""

    paper = "—"
    positional = None
    ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio != 0:
            from ..errors import KVFoldError

            raise KVFoldError("none keeps every token: it takes no ratio (use e.g. snapkv:0.5 to compress)")

    @classmethod
    def knobs(cls) -> dict[str, object]:
        return {}

    def keep_count(self, n_valid: torch.Tensor) -> torch.Tensor:
        return n_valid

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        return x.positions.float()
