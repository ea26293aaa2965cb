"""kvfold's attention function, registered with transformers' `AttentionInterface` as "kvfold".

The attention module calls `cache.update(k, v, layer_idx)`, which for a `KVFoldCache` returns a `StagedKV`
handle instead of concatenated tensors; this function then sees queries, keys and values together:
- first forward of a layer (prefill): exact SDPA over the new tokens (or, with `KVFOLD_PREFILL=int8|sparse`, the
  int8 or sparse attention of `kernels.prefill` / `kernels.sparse`, or their references where the kernels do not
  run), then the method compresses and stores them;
- decoding: the token is stored, then attention reads the compressed store page by page (the Triton kernel on
  CUDA, `kernels.reference.paged_attention` elsewhere), never rebuilding the whole context in full precision;
- a multi-token turn on a filled cache: attention over the store plus the new tokens, then the new tokens are
  stored (compressed too when the cache has `compress_appends`).
Without a kvfold cache (e.g. `use_cache=False`) it is plain SDPA.

Its mask function (`kvfold_mask`) builds transformers' SDPA mask for a first forward, but for a multi-token turn
after a past only the last query's row: that is all a kvfold cache reads (which new keys are valid), and the whole
[batch, 1, n, past + n] mask of a prefill chunk at 32k was half a gigabyte of transient memory.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .joint import JointStaged
from .kernels import PrefillAttention
from .layer import StagedKV

NAME = "kvfold"


def _last_row(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, 1, 1, keys] bool: the keys the mask's last query may attend to (an additive mask: where it is 0)."""
    last_row = attention_mask[:, :, -1:, :]
    return last_row if last_row.dtype == torch.bool else last_row == 0


def _valid_new_keys(attention_mask: torch.Tensor | None, batch: int, new: int, device) -> torch.Tensor:
    """[batch, new] bool: the new keys the last query may attend to (False = padding or outside a sliding window)."""
    if attention_mask is None:
        return torch.ones(batch, new, dtype=torch.bool, device=device)
    return _last_row(attention_mask)[:, 0, 0, -new:].expand(batch, new)


def _turn_mask(attention_mask: torch.Tensor | None, new: int, total: int, sliding: bool) -> torch.Tensor:
    """The full [batch, 1, new, total] mask of a turn after a past held by a cache that is not kvfold's, from the
    last query's row that `kvfold_mask` built: each query sees the valid keys up to its own position."""
    if attention_mask is not None and attention_mask.shape[-2] == new:
        return attention_mask
    if sliding:
        from .errors import KVFoldError

        raise KVFoldError("kvfold attention with a sliding window over a past that is not a kvfold cache: pass a "
                          "cache from kvfold.make_cache, or load the model with attn_implementation='sdpa'")
    device = attention_mask.device if attention_mask is not None else None
    causal = torch.ones(new, total, dtype=torch.bool, device=device).tril(total - new)
    if attention_mask is None:
        return causal[None, None]
    return _last_row(attention_mask) & causal


def kvfold_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | StagedKV,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if isinstance(key, JointStaged):  # one decode step of several caches (continuous batching)
        return key.attend(lambda q, staged, v: kvfold_attention(module, q, staged, v, None, scaling, dropout,
                                                                **kwargs)[0], query, value,
                          scaling if scaling is not None else query.shape[-1] ** -0.5), None
    if not isinstance(key, StagedKV):
        if query.shape[2] > 1 and key.shape[2] > query.shape[2]:  # a turn after another cache's past
            sliding = bool(kwargs.get("sliding_window") or getattr(module, "sliding_window", None))
            attention_mask = _turn_mask(attention_mask, query.shape[2], key.shape[2], sliding)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    staged, layer = key, key.layer
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer.fast is not None and staged.keys.shape[2] == 1:  # the fast decode loop (kvfold.fastpath)
        return layer.fast.step(staged, query, scale), None
    if kwargs.get("softcap") is not None:
        from .errors import KVFoldError

        raise KVFoldError("attention logit soft-capping (e.g. Gemma2) is not supported by kvfold yet")
    if layer.stored_tokens == 0 and staged.start == 0:
        valid = _valid_new_keys(attention_mask, query.shape[0], staged.keys.shape[2], query.device)
        how = PrefillAttention.from_env()
        if how.applies(bool(valid.all()), kwargs):
            out = how.attend(query, staged.keys, staged.values, scale)
        else:
            out, _ = sdpa_attention_forward(module, query, staged.keys, staged.values, attention_mask,
                                            dropout=dropout, scaling=scale, **kwargs)
        layer.ingest(staged, query, valid, scale)
        return out, None
    new = staged.keys.shape[2]
    if new == 1:  # decoding: store the token, read the store, keep the budget
        layer.append(staged, query)
        out = layer.attend(query, staged.positions(), scale)
        layer.after_decode(new)
        return out, None
    valid = _valid_new_keys(attention_mask, query.shape[0], new, query.device)
    out = layer.attend(query, staged.positions(), scale, new=layer.new_chunk(staged, valid))
    layer.ingest(staged, query, valid, scale)
    return out, None


def kvfold_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, **kwargs) -> torch.Tensor | None:
    """transformers' `sdpa_mask`, but a turn of several tokens after a past gets only its last query's row
    [batch, 1, 1, kv_length] (or None when nothing is masked): what `_valid_new_keys` reads."""
    if q_length > 1 and isinstance(q_offset, int) and q_offset > 0:
        q_offset, q_length = q_offset + q_length - 1, 1
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, **kwargs)


def register() -> None:
    """Make "kvfold" a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(NAME, kvfold_attention)
    AttentionMaskInterface.register(NAME, kvfold_mask)
