"""Sparse prefill (FlexPrefill, Lai et al. 2025, arXiv:2502.20766): per head, choose which key blocks each query
block reads, then block-sparse causal attention in Triton.

`flexprefill_mask(query, key, scale, gamma, tau, block)` picks the pattern, in PyTorch:
1. The last query block's exact attention â over every key (one block of queries: cheap; each KV head's keys
   are multiplied with its group's queries in place, and the pooled blocks are summed in float32 without a
   float32 copy of Q or K).
2. Its block distribution is compared with an estimate from pooled queries and keys. If their Jensen–Shannon
   distance is below `tau`, the pooled estimate is trusted for every query block: query-aware. Else the head
   uses a vertical-slash pattern read from â: key columns (vertical) and query-key offsets (slash).
3. Query-aware heads: each query block keeps the fewest key blocks, by pooled score, whose estimated attention
   sums to `gamma`. Vertical-slash heads: the fewest columns and the fewest offsets whose mass sums to `gamma`,
   turned into the blocks they cross. Every query block also keeps its diagonal block.

`sparse_prefill(query, key, value, block_mask, scale, block)` computes `reference.block_sparse_attention` with
the selected blocks only: per query block, a list of key blocks below the diagonal (no causal mask) and the
diagonal block (masked). The mask is an approximation of full attention; its recall of the attention mass is
measured, not assumed (`tests/kernels/test_sparse.py`, `benchmarks/sparse_prefill.py`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import softmax_update
from .prefill import LOG2E


def _cumulative_pick(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """[..., n] non-negative scores -> bool [..., n]: the fewest largest entries whose share reaches `gamma`."""
    share = scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
    ordered, order = share.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the larger entries: keep while it is still below gamma
    picked = torch.zeros_like(share, dtype=torch.bool)
    return picked.scatter(-1, order, (before < gamma) & (ordered > 0))


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    mean = (p + q) / 2
    kl = lambda a: (a * (a.clamp_min(1e-30).log() - mean.clamp_min(1e-30).log())).sum(-1)  # noqa: E731
    return ((kl(p) + kl(q)) / 2).clamp_min(0).sqrt()


def _block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., tokens, dim] -> float32 sums over each block of `block` tokens [..., blocks, dim] (the last block may be
    short), accumulated in float32 without a float32 copy of x."""
    tokens, whole = x.shape[-2], x.shape[-2] // block
    sums = x[..., :whole * block, :].unflatten(-2, (whole, block)).sum(-2, dtype=torch.float32)
    if whole * block < tokens:
        sums = torch.cat([sums, x[..., whole * block:, :].sum(-2, keepdim=True, dtype=torch.float32)], dim=-2)
    return sums


def flexprefill_mask(query: torch.Tensor, key: torch.Tensor, scale: float, gamma: float = 0.9, tau: float = 0.1,
                     block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mask [batch, q_heads, blocks, blocks] (bool) for a causal prefill of query/key [batch, heads, tokens,
    dim] (GQA), and which heads went query-aware [batch, q_heads]; see the module doc."""
    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    blocks = -(-tokens // block)
    block_of = torch.arange(tokens, device=query.device) // block
    last = query[:, :, (blocks - 1) * block:].float()  # the last query block, [.., n, dim]
    last_pos = torch.arange((blocks - 1) * block, tokens, device=query.device)
    causal = torch.arange(tokens, device=query.device)[None, :] <= last_pos[:, None]
    # each KV head's keys against its group's queries at once (no copy of the keys per query head)
    grouped = last.reshape(batch, kv_heads, group * last.shape[2], dim) @ key.float().transpose(-1, -2)
    a_hat = torch.softmax((grouped.view(batch, q_heads, -1, tokens) * scale).masked_fill(~causal, float("-inf")), -1)
    true_blocks = torch.zeros(batch, q_heads, blocks, device=query.device).index_add_(
        2, block_of, a_hat.mean(dim=2))
    counts = torch.bincount(block_of, minlength=blocks).clamp_min(1).float()
    pooled_keys = (_block_sums(key, block) / counts[:, None]).repeat_interleave(group, 1)  # [.., blocks, dim]
    pooled_queries = _block_sums(query, block) / counts[:, None]
    estimate_last = torch.softmax((pooled_queries[:, :, -1:] @ pooled_keys.transpose(-1, -2)).squeeze(2) * scale, -1)
    query_aware = _js_distance(true_blocks, estimate_last) < tau
    # query-aware: pooled scores for every query block, causal over blocks
    block_causal = torch.ones(blocks, blocks, dtype=torch.bool, device=query.device).tril()
    pooled = torch.softmax(((pooled_queries @ pooled_keys.transpose(-1, -2)) * scale).masked_fill(
        ~block_causal, float("-inf")), dim=-1)
    aware_mask = _cumulative_pick(pooled, gamma) & block_causal
    # vertical-slash from the last block's attention: columns, and offsets (query position - key position)
    vertical = _cumulative_pick(a_hat.sum(dim=2), gamma)  # [.., tokens]
    offsets = (last_pos[:, None] - torch.arange(tokens, device=query.device)[None, :]).clamp_min(0)
    slash_mass = torch.zeros(batch, q_heads, tokens, device=query.device).index_add_(
        2, offsets.flatten(), a_hat.flatten(2))
    slash = _cumulative_pick(slash_mass, gamma).float()  # [.., offsets]
    vertical_blocks = torch.zeros(batch, q_heads, blocks, device=query.device).index_add_(
        2, block_of, vertical.float()) > 0
    # an offset o reaches the block diagonals o // block and (o + block - 1) // block
    offset_ids = torch.arange(tokens, device=query.device)
    diagonal = torch.zeros(batch, q_heads, blocks, device=query.device).index_add_(2, offset_ids // block, slash)
    diagonal = diagonal.index_add_(2, ((offset_ids + block - 1) // block).clamp_max(blocks - 1), slash) > 0
    distance = torch.arange(blocks, device=query.device)[:, None] - torch.arange(blocks, device=query.device)[None, :]
    slash_mask = diagonal[..., distance.clamp_min(0)] & (distance >= 0)
    vs_mask = (vertical_blocks[..., None, :] & block_causal) | slash_mask
    mask = torch.where(query_aware[..., None, None], aware_mask, vs_mask)
    return mask | torch.eye(blocks, dtype=torch.bool, device=query.device), query_aware


@triton.jit
def _sparse_tile(q, j, offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale, D: tl.constexpr,
                 BLOCK: tl.constexpr, DIAGONAL: tl.constexpr):
    """Key block j into the running softmax. Below the diagonal every query of the tile sees every key of the
    block; on it (DIAGONAL) the causal mask and the end of the keys apply."""
    keys = j * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    at = (kv_head * tokens + keys[:, None]) * D + offs_d[None, :]
    if DIAGONAL:
        k = tl.load(k_ptr + at, mask=keys[:, None] < tokens, other=0.0)
        visible = (keys[None, :] <= offs_m[:, None]) & (keys[None, :] < tokens)
        s = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        v = tl.load(v_ptr + at, mask=keys[:, None] < tokens, other=0.0)
    else:
        s = tl.dot(q, tl.trans(tl.load(k_ptr + at))) * scale
        v = tl.load(v_ptr + at)
    p, alpha, m_i, l_i = softmax_update(s, m_i, l_i, True)
    return m_i, l_i, tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _sparse_kernel(q_ptr, k_ptr, v_ptr, picks_ptr, counts_ptr, diagonal_ptr, out_ptr, tokens, blocks, scale,
                   Q_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                   INTERPRETED_BLOCKS: tl.constexpr):
    block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last) query blocks first
    head = tl.program_id(1).to(tl.int64)  # batch * q_heads + q_head
    kv_head = (head // Q_HEADS) * (Q_HEADS // GROUP) + (head % Q_HEADS) // GROUP
    offs_m = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (head * tokens + offs_m[:, None]) * D + offs_d[None, :], mask=offs_m[:, None] < tokens,
                other=0.0)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    row = head * blocks + block
    count = tl.load(counts_ptr + row)
    if INTERPRETED_BLOCKS:  # Triton's interpreter loops only to constants
        for index in range(0, INTERPRETED_BLOCKS):
            if index < count:
                m_i, l_i, acc = _sparse_tile(q, tl.load(picks_ptr + row * blocks + index), offs_m, m_i, l_i, acc,
                                             k_ptr, v_ptr, kv_head, tokens, scale, D, BLOCK, False)
    else:
        for index in range(0, count):
            m_i, l_i, acc = _sparse_tile(q, tl.load(picks_ptr + row * blocks + index), offs_m, m_i, l_i, acc, k_ptr,
                                         v_ptr, kv_head, tokens, scale, D, BLOCK, False)
    if tl.load(diagonal_ptr + row) != 0:
        m_i, l_i, acc = _sparse_tile(q, block, offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale, D, BLOCK,
                                     True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (head * tokens + offs_m[:, None]) * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < tokens)


def block_lists(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal block mask [..., blocks, blocks] as the kernel walks it: per query block, the selected key blocks
    below the diagonal in ascending order (int32 [..., blocks, blocks], the first `counts` valid), their counts
    (int32 [..., blocks]) and whether the diagonal block is selected (int8 [..., blocks])."""
    blocks = block_mask.shape[-1]
    below = block_mask & torch.ones(blocks, blocks, dtype=torch.bool, device=block_mask.device).tril(-1)
    picks = torch.sort((~below).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)  # selected first
    return picks, below.sum(-1, dtype=torch.int32), block_mask.diagonal(dim1=-2, dim2=-1).to(torch.int8)


def sparse_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                   scale: float, block: int = 64, launch: dict | None = None) -> torch.Tensor:
    """`reference.block_sparse_attention` in Triton: 16-bit query/key/value [batch, heads, tokens, dim] (GQA),
    block_mask [batch, q_heads, blocks, blocks]; output [batch, q_heads, tokens, dim] in the value dtype. Only the
    selected blocks are read: the mask becomes per-query-block lists of key blocks (`block_lists`)."""
    batch, q_heads, tokens, dim = query.shape
    blocks = -(-tokens // block)
    if q_heads % key.shape[1] or block_mask.shape != (batch, q_heads, blocks, blocks):
        raise ValueError(f"sparse_prefill: q_heads must be a multiple of kv_heads and the mask [batch, q_heads, "
                         f"{blocks}, {blocks}], got {tuple(block_mask.shape)}")
    picks, counts, diagonal = block_lists(block_mask.bool())
    out = torch.empty(batch, q_heads, tokens, dim, device=query.device, dtype=value.dtype)
    interpreted = blocks if os.environ.get("TRITON_INTERPRET") == "1" else 0
    options = {"num_warps": 8 if block >= 128 else 4, "num_stages": 2 if block >= 128 else 3, **(launch or {})}
    _sparse_kernel[(blocks, batch * q_heads)](
        query.contiguous(), key.contiguous(), value.contiguous(), picks, counts, diagonal, out, tokens, blocks,
        scale * LOG2E,
        Q_HEADS=q_heads, GROUP=q_heads // key.shape[1], D=dim, BLOCK=block, INTERPRETED_BLOCKS=interpreted,
        **options)
    return out
