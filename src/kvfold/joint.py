"""`JointCache`: one decode step for several independent kvfold caches, as one batch through the model.

Continuous batching (`kvfold serve`) puts requests that arrived at different times, with prompts of different
lengths and even different methods, into one forward per step: the weights are read once for every request, which
is what decoding at batch > 1 buys. Each request keeps its own `KVFoldCache`: batch row i of the step is request
i's cache. Its layers store the new token and attend over their own store (their own method, clocks and positions),
so every request decodes exactly as it would alone, apart from the rounding of batched matrix products.
Only one-token steps are joined: prompts are prefilled one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import KVFoldError
from .layer import KVFoldLayer, StagedKV


class JointStaged:
    """What a `JointLayer.update` hands the attention function: each member's own `StagedKV`, one row each."""

    def __init__(self, members: list[StagedKV]) -> None:
        self.members = members

    def attend(self, attend_one: Callable[[torch.Tensor, StagedKV, torch.Tensor], torch.Tensor],
               query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Row i's query attends through member i (`attend_one(query_i, staged_i, value_i)`); outputs are stacked
        along the batch in row order."""
        return torch.cat([attend_one(query[i:i + 1], staged, value[i:i + 1])
                          for i, staged in enumerate(self.members)], dim=0)


class JointLayer(CacheLayerMixin):
    """Layer `index` of every member cache, one batch row each."""

    is_compileable = False
    is_sliding = False

    def __init__(self, members: list[KVFoldLayer]) -> None:
        super().__init__()
        self.members = members
        self.is_sliding = members[0].is_sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != len(self.members) or key_states.shape[2] != 1:
            raise KVFoldError(f"a joint step takes one token for each of its {len(self.members)} caches, got "
                              f"batch {key_states.shape[0]} × {key_states.shape[2]} tokens")
        staged = [member.update(key_states[i:i + 1], value_states[i:i + 1])[0]
                  for i, member in enumerate(self.members)]
        return JointStaged(staged), value_states

    def get_seq_length(self) -> int:
        return max(member.seen for member in self.members)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class JointCache(Cache):
    """Batch row i is `caches[i]` (each of batch 1, prefilled): pass as the cache of a one-token forward with
    `position_ids` [[seq_length of cache i] for each i]."""

    def __init__(self, caches: Sequence) -> None:
        if not caches:
            raise KVFoldError("a joint step needs at least one cache")
        depth = {len(cache.layers) for cache in caches}
        if len(depth) != 1 or any(layer_rows(cache) != {1} for cache in caches):
            raise KVFoldError("joint caches must come from one model and hold one sequence each (batch 1)")
        super().__init__(layers=[JointLayer([cache.layers[i] for cache in caches]) for i in range(depth.pop())])
        self.caches = list(caches)

    def positions(self, device) -> torch.Tensor:
        """[batch, 1]: the position of each row's next token (its cache's sequence length)."""
        return torch.tensor([[cache.get_seq_length()] for cache in self.caches], device=device)


def layer_rows(cache) -> set[int]:
    """The batch sizes of a cache's initialized layers."""
    return {layer.batch_size for layer in cache.layers if layer.is_initialized}
