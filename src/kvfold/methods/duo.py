"""`duo`: DuoAttention — retrieval heads keep the whole context, streaming heads keep only the attention sinks and
the newest tokens; which heads are which comes from a profile of the model (`kvfold inspect`).

Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", ICLR 2025
(arXiv:2410.10819). The paper learns a gate per head by optimisation; here the ranking is the retrieval score that
`kvfold inspect` measures (the attention the question pays to a planted needle), the largest over the query heads
of a KV head's GQA group. The `streaming` fraction of all KV heads with the lowest scores become streaming heads:
they keep the scorer's protected tokens only (its `sink` first and `window` newest, e.g. `sink=4,window=256`);
every other head keeps all its tokens. Rows become ragged and the streaming heads' pages are freed.
`duo:profile=DIR` is `snapkv@duo:profile=DIR` (the scorer only marks the protected span here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from .base import PROTECTED, Budget, ScoreInputs, check_fraction, register


@register("duo")
@dataclass(frozen=True)
class DuoBudget(Budget):
    """Retrieval KV heads keep everything; the `streaming` share of KV heads with the lowest retrieval scores keep
    only sink + window tokens."""

    paper = "DuoAttention (Xiao et al., 2024)"
    profile: str = ""
    streaming: float = 0.5

    def __post_init__(self) -> None:
        check_fraction("duo: streaming", self.streaming, "the share of KV heads made streaming")
        if not isinstance(self.profile, str) or not self.profile:
            raise KVFoldError("duo needs profile=PATH: a profile.json (or its folder) written by "
                              "`kvfold inspect --task niah --out DIR` for this model")
        from ..inspection.profile import head_matrix, load_profile

        profile = load_profile(self.profile)
        scores = torch.tensor(head_matrix(profile, "retrieval"), dtype=torch.float64)  # [layers, q_heads]
        model = profile["model"]
        group = model["heads"] // model["kv_heads"]
        per_kv_head = scores.view(model["layers"], model["kv_heads"], group).amax(dim=-1)
        count = round(self.streaming * per_kv_head.numel())
        order = per_kv_head.flatten().argsort(stable=True)
        streaming = torch.zeros(per_kv_head.numel(), dtype=torch.bool)
        streaming[order[:count]] = True
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_streaming_heads", streaming.view_as(per_kv_head))

    def streaming_heads(self) -> torch.Tensor:
        """[layers, kv_heads] bool: True where a head is a streaming head."""
        return self._streaming_heads

    def check_model(self, config) -> None:
        from ..inspection.profile import check_profile_model

        check_profile_model(self._model, config, self.profile)  # the identity read at parse time; no second read

    def select(self, scores: torch.Tensor, keep: torch.Tensor, layer: int = 0, layers: int = 1,
               inputs: ScoreInputs | None = None) -> torch.Tensor:
        batch, heads, _ = scores.shape
        if (layers, heads) != tuple(self._streaming_heads.shape):
            raise KVFoldError(f"duo: the profile is for {self._model['layers']} layers x {self._model['kv_heads']} "
                              f"KV heads ({self._model['name']}), this model has {layers} x {heads}: run "
                              "`kvfold inspect` for this model")
        streaming = self._streaming_heads[layer].to(scores.device).view(1, heads, 1)
        return torch.where(streaming, scores >= PROTECTED, torch.isfinite(scores))
