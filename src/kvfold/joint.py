"""`JointCache`: one decode step for several independent kvfold caches, as one batch through the model.

Continuous batching (`kvfold serve`) puts requests that arrived at different times, with prompts of different
lengths and even different methods, into one forward per step: the weights are read once for every request, which
is what decoding at batch > 1 buys. Each request keeps its own `KVFoldCache`: batch row i of the step is request
i's cache. Its layers store the new token and attend over their own store (their own method, clocks and positions),
so every request decodes exactly as it would alone, apart from the rounding of batched matrix products.
Only one-token steps are joined: prompts are prefilled one request at a time.
In the fast loop's segments (`fastpath.Segments`), requests whose caches draw on one `pages.PoolSet` (a server's)
and share a method also attend together: one kernel launch per layer reads every request's rows
(`fastpath.joint_step`), instead of one launch per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import KVFoldError
from .fastpath import joint_key, joint_step, run_then_capture
from .layer import KVFoldLayer, StagedKV


class JointStaged:
    """What a `JointLayer.update` hands the attention function: each member's own `StagedKV` (one row each) and
    the step's keys and values [members, kv_heads, 1, dim]."""

    def __init__(self, members: list[StagedKV], keys: torch.Tensor, values: torch.Tensor) -> None:
        self.members, self.keys, self.values = members, keys, values

    def attend(self, attend_one: Callable[[torch.Tensor, StagedKV, torch.Tensor], torch.Tensor],
               query: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """Row i's query attends over member i's store; outputs are stacked along the batch in row order.
        Members in the fast loop's segments whose layers share method and pools (`fastpath.joint_key`: a server's
        requests, whose caches draw on one `PoolSet`) run as one `fastpath.joint_step`; the others one by one
        (`attend_one(query_i, staged_i, value_i)`). A joinable member alone in its group runs `joint_step` too, so
        it reads its store the same way, bit for bit, whether or not others share the step."""
        groups: dict[object, list[int]] = {}
        for i, staged in enumerate(self.members):
            key = joint_key(staged.layer)
            groups.setdefault(key if key is not None else ("alone", i), []).append(i)
        if len(groups) == 1 and next(iter(groups))[0] != "alone":
            return joint_step([staged.layer for staged in self.members], self.keys, self.values, query, scale)
        outputs: list[torch.Tensor | None] = [None] * len(self.members)
        for key, rows in groups.items():
            if key[0] == "alone":
                i = rows[0]
                outputs[i] = attend_one(query[i:i + 1], self.members[i], value[i:i + 1])
                continue
            take = slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 else rows
            out = joint_step([self.members[i].layer for i in rows], self.keys[take], self.values[take],
                             query[take], scale)
            for i, row in zip(rows, out):
                outputs[i] = row.unsqueeze(0)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


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
        return JointStaged(staged, key_states, value_states), value_states

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


def joint_forward(model, caches: Sequence, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits [batch, vocab] of one joint step: row i is `caches[i]`'s next token `tokens[i]` at `positions[i]`."""
    from .models import cache_keyword

    return model(input_ids=tokens, position_ids=positions, use_cache=True,
                 **{cache_keyword(model): JointCache(caches)}).logits[:, -1]


class JointGraphs:
    """Replays a server's joint decode step from a CUDA graph while the same requests keep decoding together.

    The step of `JointCache` through the fast loop's segments touches only the GPU (in-place pages, device tables,
    one `fastpath.joint_step` per layer), so it can be captured like `kvfold.decoding`'s. A graph holds the tensors
    it read: it is captured for one set of requests, once that set has run `calm` steps unchanged, and dropped when
    a request joins or leaves, or a segment or another request's prefill moved a table or pool. Positions come from
    the segments' clocks (`Segments.seen`), which replays keep, not from the layers' counters, which they skip.
    A set of requests that cannot be captured (`applies`) runs eagerly.
    """

    def __init__(self, model, device: torch.device, calm: int = 2) -> None:
        self.model, self.device, self.calm = model, device, calm
        self.stream = torch.cuda.Stream(device)
        self.key: tuple | None = None
        self.capturable = False  # whether the requests of `key` can be captured (`applies`)
        self.unchanged = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids = self.positions = self.logits = None
        self.captures = self.replays = 0
        self.failed: str | None = None  # why a capture failed: every step is eager from then on

    @staticmethod
    def applies(caches: Sequence) -> bool:
        """Every layer of every cache in the fast loop on the kernel, all joinable as one group, and no decode-time
        eviction or remembered queries: the single-cache loop captures those since the queries became a ring
        written in place (`KVFoldLayer._remember_queries`), but the joint graph has not been tried with them."""
        for index in range(len(caches[0].layers)):
            keys = {joint_key(cache.layers[index]) for cache in caches}
            if len(keys) != 1 or None in keys:
                return False
        compressor = caches[0].layers[0].compressor
        quantizer = compressor.quantizer
        return not compressor.scorer.every and not (quantizer is not None and quantizer.remembered_queries)

    def step(self, caches: Sequence, tokens: torch.Tensor, positions: torch.Tensor, moved: bool) -> torch.Tensor:
        """Logits [batch, vocab] of one joint step of `caches` (fast segments begun) on `tokens` at `positions`
        ([batch, 1] each). `moved`: a segment began with new tables or a pool moved since the last step."""
        key = tuple(id(cache) for cache in caches)
        if moved or key != self.key:  # what decides `applies` is fixed for a set of requests: checked once
            self.capturable = self.capturable if key == self.key else self.applies(caches)
            self.key, self.unchanged, self.graph = key, 0, None
        if self.graph is not None:
            self.ids.copy_(tokens)
            self.positions.copy_(positions)
            self.graph.replay()
            self.replays += 1
            return self.logits
        self.unchanged += 1
        if self.failed or not self.capturable or self.unchanged < self.calm:
            return joint_forward(self.model, caches, tokens, positions)
        self.ids, self.positions = tokens.clone(), positions.clone()
        logits, self.graph, self.logits, error = run_then_capture(
            self.device, self.stream, [layer for cache in caches for layer in cache.layers],
            lambda: joint_forward(self.model, caches, tokens, positions),
            lambda: joint_forward(self.model, caches, self.ids, self.positions))
        if error is not None:
            self.failed = f"{type(error).__name__}: {error}"
        else:
            self.captures += 1
        return logits
