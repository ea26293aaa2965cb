"""`streaming`: StreamingLLM — attention sinks plus a window of the newest tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv:2309.17453).
Keys keep their original RoPE positions (the paper re-indexes positions inside the cache to run past the
pretrained length; kvfold compresses within the model's context, where original positions are exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import ScoreInputs, Scorer, register


@register("streaming")
@dataclass(frozen=True)
class StreamingLLM(Scorer):
    """Keeps `sink` first tokens and the newest ones: a fixed `window`, or as many as the `ratio` allows."""

    paper = "StreamingLLM (Xiao et al., 2024)"
    ratio: float = 0.5
    window: int = 0
    sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window and self.ratio not in (0, 0.5):
            raise KVFoldError("streaming: give either a ratio or a fixed window=, not both")
        if self.window and self.budget:
            raise KVFoldError("streaming: window= and budget= both fix the cache size; give one "
                              f"(budget={self.budget} keeps sink={self.sink} + the newest {self.budget - self.sink})")

    def spec(self) -> str:
        if not self.window:
            return super().spec()
        return f"streaming:sink={self.sink},window={self.window}" + (f",every={self.every}" if self.every else "")

    @property
    def fixed_size(self) -> bool:
        return bool(self.budget or self.window)

    def keep_count(self, n_valid: torch.Tensor) -> torch.Tensor:
        if self.window:
            return torch.clamp(torch.full_like(n_valid, self.sink + self.window), max=n_valid)
        return super().keep_count(n_valid)

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        return x.positions.float()
