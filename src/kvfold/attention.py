"""kvfold's attention function, registered with transformers' `AttentionInterface` as "kvfold".

The attention module calls `cache.update(k, v, layer_idx)`, which for a `KVFoldCache` returns a `StagedKV`
handle instead of concatenated tensors; this function then sees queries, keys and values together:
- first forward of a layer (prefill): exact SDPA over the new tokens (or, with `KVFOLD_PREFILL=int8|sparse`, the
  int8 or sparse attention of `kernels.prefill` / `kernels.sparse`), then the method compresses and stores them;
- decoding: the token is stored, then attention reads the compressed store page by page (the Triton kernel on
  CUDA, `kernels.reference.paged_attention` elsewhere), never rebuilding the whole context in full precision;
- a multi-token turn on a filled cache: attention over the store plus the new tokens, then the new tokens are
  stored (compressed too when the cache has `compress_appends`).
Without a kvfold cache (e.g. `use_cache=False`) it is plain SDPA.
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


def _valid_new_keys(attention_mask: torch.Tensor | None, batch: int, new: int, device) -> torch.Tensor:
    """[batch, new] bool: the new keys the last query may attend to (False = padding or outside a sliding window)."""
    if attention_mask is None:
        return torch.ones(batch, new, dtype=torch.bool, device=device)
    last_row = attention_mask[:, 0, -1, -new:]
    if last_row.dtype != torch.bool:
        last_row = last_row == 0
    return last_row.expand(batch, new)


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
    if isinstance(key, JointStaged):  # one decode step of several caches (continuous batching): row by row
        return key.attend(lambda q, staged, v: kvfold_attention(module, q, staged, v, None, scaling, dropout,
                                                                **kwargs)[0], query, value), None
    if not isinstance(key, StagedKV):
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
        if how.applies(query, bool(valid.all()), kwargs):
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


def register() -> None:
    """Make "kvfold" a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(NAME, kvfold_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
