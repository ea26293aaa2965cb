"""Sparse prefill (FlexPrefill, Lai et al. 2025, arXiv:2502.20766): per head, choose which key blocks each query
block reads (`kernels.pattern.flexprefill_mask`, in PyTorch), then block-sparse causal attention in Triton.

`sparse_prefill(query, key, value, block_mask, scale, block)` computes `reference.block_sparse_attention` with
the selected blocks only: per query block, a list of key blocks below the diagonal (no causal mask) and the
diagonal block (masked). The mask is an approximation of full attention; its recall of the attention mass is
measured, not assumed (`tests/kernels/test_sparse.py`, `benchmarks/sparse_prefill.py`).
Launch options (`launch=`, all equal to the reference; timed by `benchmarks/sparse_prefill.py --kernel-launches`):
FOLD (the scale folded into the exponent's shift: H200, 128k, 11.99 -> 11.48 ms), LAZY (FOLD, and the running
maximum moved only when a row's grows past 2^8; 12.15 ms), PAIRED (two listed key blocks a step; 12.50 ms), and
ANCHORED, the default (with FOLD for the anchors): the anchors first (the diagonal block and the first listed one,
the sink's when listed) with the running maximum, then the other listed blocks shifted by the anchors' maximum, so
no row maximum, rescale or alpha per block (a unified maximum as in FlashDecoding++, Hong et al. 2024,
arXiv:2311.01282, with its redo on overflow as a second launch over the flagged query blocks): the key loop's sm_90
SASS 319 -> 241 instructions, 126 registers, no spill (`benchmarks/inspect_kernel.py --sparse`); H100, 128k, the
captured layer at 23% of the blocks: 11.67 -> 10.21 ms, no query block redone, outputs within one bfloat16 ulp
of FOLD's (`sparse_prefill_h100_captured_int4_sum_g097_r4_sweep.md`). By those counts FOLD's loop is bound by
instruction issue at head_dim 64 (34 MUFU instructions at 8 cycles a warp, 272, against 319 issued), which is also
why FlashAttention-4's polynomial exponentials were not kept (tried offline: on sm_90 the loop took 576
instructions, 2 MUFU: ~8 an exponential).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import softmax_update
from .prefill import LOG2E


@triton.jit
def _folded_update(s, m_i, l_i, scale):
    """`common.softmax_update` (base 2) of raw scores no row of which is all hidden: the maximum over the raw
    scores (the scale is positive), the scale folded into the shift (one multiply-add a score)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)
    p = tl.math.exp2(s * scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _sparse_tile(q, j, offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale, D: tl.constexpr,
                 BLOCK: tl.constexpr, DIAGONAL: tl.constexpr, FOLD: tl.constexpr, LAZY: tl.constexpr,
                 ANCHORED: tl.constexpr = False):
    """Key block j into the running softmax. Below the diagonal every query of the tile sees every key of the
    block; on it (DIAGONAL) the causal mask and the end of the keys apply. FOLD: the maximum is taken over the raw
    scores (the scale is positive) and the scale folds into the shift, one multiply-add a score instead of a
    multiply and an add. ANCHORED (below the diagonal): the shift stays m_i, the anchors' maximum (no row maximum,
    no rescale; weights above 1 where a score passes the anchors')."""
    keys = j * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    at = (kv_head * tokens + keys[:, None]) * D + offs_d[None, :]
    if DIAGONAL:
        k = tl.load(k_ptr + at, mask=keys[:, None] < tokens, other=0.0)
        visible = (keys[None, :] <= offs_m[:, None]) & (keys[None, :] < tokens)
        s = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        v = tl.load(v_ptr + at, mask=keys[:, None] < tokens, other=0.0)
        p, alpha, m_i, l_i = softmax_update(s, m_i, l_i, True)
    elif LAZY or ANCHORED:  # the shift m_i moves (LAZY) only when a row's maximum grows by more than 8 (FA4's
        # rescaling; ANCHORED: never)
        s = tl.dot(q, tl.trans(tl.load(k_ptr + at)))
        v = tl.load(v_ptr + at)
        if LAZY:
            m_tile = tl.max(s, axis=1) * scale
            if tl.max(m_tile - m_i, axis=0) > 8.0:  # one branch for the tile: most tiles of a long row skip it
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.math.exp2(m_i - m_new)
                acc, l_i, m_i = acc * alpha[:, None], l_i * alpha, m_new
        p = tl.math.exp2(s * scale - m_i[:, None])  # LAZY: <= 2^8
        l_i += tl.sum(p, axis=1)
        alpha = tl.full([BLOCK], 1.0, tl.float32)  # acc is already rescaled (a multiply by one folds away)
    elif FOLD:  # every row sees the whole block: its maximum is finite, and so is the running one after it
        s = tl.dot(q, tl.trans(tl.load(k_ptr + at)))
        v = tl.load(v_ptr + at)
        p, alpha, m_i, l_i = _folded_update(s, m_i, l_i, scale)
    else:
        s = tl.dot(q, tl.trans(tl.load(k_ptr + at))) * scale
        v = tl.load(v_ptr + at)
        p, alpha, m_i, l_i = softmax_update(s, m_i, l_i, True)
    return m_i, l_i, tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _pair_tile(q, a, b, m_i, l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale, D: tl.constexpr, BLOCK: tl.constexpr):
    """Key blocks a and b (both below the diagonal) into the running softmax as one tile of 2 * BLOCK keys: the
    per-tile work (row maxima and sums, the accumulator's rescale, the loop) once for both. The scale is folded
    into the shift as with FOLD."""
    slots = tl.arange(0, 2 * BLOCK)
    keys = tl.where(slots < BLOCK, a * BLOCK + slots, b * BLOCK + slots - BLOCK)
    at = (kv_head * tokens + keys[:, None]) * D + tl.arange(0, D)[None, :]
    s = tl.dot(q, tl.trans(tl.load(k_ptr + at)))
    v = tl.load(v_ptr + at)
    p, alpha, m_i, l_i = _folded_update(s, m_i, l_i, scale)
    return m_i, l_i, tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _online_blocks(q, offs_m, block, row, count, picks, diagonal_ptr, k_ptr, v_ptr, kv_head, tokens, scale,
                   D: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED_BLOCKS: tl.constexpr, FOLD: tl.constexpr,
                   LAZY: tl.constexpr, PAIRED: tl.constexpr):
    """The query tile over its `count` listed key blocks at `picks`, then its diagonal block (if selected), with
    the running maximum: (m, l, acc)."""
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    if PAIRED:
        if INTERPRETED_BLOCKS:  # Triton's interpreter loops only to constants
            for index in range(0, INTERPRETED_BLOCKS // 2):
                if index < count // 2:
                    m_i, l_i, acc = _pair_tile(q, tl.load(picks + 2 * index), tl.load(picks + 2 * index + 1), m_i,
                                               l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale, D, BLOCK)
        else:
            for index in range(0, count // 2):
                m_i, l_i, acc = _pair_tile(q, tl.load(picks + 2 * index), tl.load(picks + 2 * index + 1), m_i, l_i,
                                           acc, k_ptr, v_ptr, kv_head, tokens, scale, D, BLOCK)
        if count % 2 != 0:
            m_i, l_i, acc = _sparse_tile(q, tl.load(picks + count - 1), offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head,
                                         tokens, scale, D, BLOCK, False, True, False)
    elif INTERPRETED_BLOCKS:
        for index in range(0, INTERPRETED_BLOCKS):
            if index < count:
                m_i, l_i, acc = _sparse_tile(q, tl.load(picks + index), offs_m, m_i, l_i, acc, k_ptr, v_ptr,
                                             kv_head, tokens, scale, D, BLOCK, False, FOLD, LAZY)
    else:
        for index in range(0, count):
            m_i, l_i, acc = _sparse_tile(q, tl.load(picks + index), offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head,
                                         tokens, scale, D, BLOCK, False, FOLD, LAZY)
    if tl.load(diagonal_ptr + row) != 0:
        m_i, l_i, acc = _sparse_tile(q, block, offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale, D, BLOCK,
                                     True, FOLD, LAZY)
    return m_i, l_i, acc


@triton.jit
def _anchored_blocks(q, offs_m, block, row, count, picks, diagonal_ptr, k_ptr, v_ptr, kv_head, tokens, scale,
                     D: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED_BLOCKS: tl.constexpr):
    """`_online_blocks` with the anchors first: the diagonal block and the first listed one (the sink's, key block 0,
    whenever it is listed) with the running maximum, then every other listed block shifted by the anchors' maximum
    (ANCHORED tiles). Finite after the anchors: each row sees a key of its diagonal block (its own) or all of a
    listed block's."""
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D], tl.float32)
    if tl.load(diagonal_ptr + row) != 0:
        m_i, l_i, acc = _sparse_tile(q, block, offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale, D, BLOCK,
                                     True, True, False)
    if count > 0:
        m_i, l_i, acc = _sparse_tile(q, tl.load(picks), offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head, tokens, scale,
                                     D, BLOCK, False, True, False)
    if INTERPRETED_BLOCKS:
        for index in range(1, INTERPRETED_BLOCKS):
            if index < count:
                m_i, l_i, acc = _sparse_tile(q, tl.load(picks + index), offs_m, m_i, l_i, acc, k_ptr, v_ptr,
                                             kv_head, tokens, scale, D, BLOCK, False, True, False, True)
    else:  # no branch in the loop: Triton pipelines the loads of a loop body without one
        for index in range(1, count):
            m_i, l_i, acc = _sparse_tile(q, tl.load(picks + index), offs_m, m_i, l_i, acc, k_ptr, v_ptr, kv_head,
                                         tokens, scale, D, BLOCK, False, True, False, True)
    return m_i, l_i, acc


@triton.jit
def _sparse_kernel(q_ptr, k_ptr, v_ptr, picks_ptr, counts_ptr, diagonal_ptr, out_ptr, overflow_ptr, tokens, blocks,
                   scale, Q_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                   INTERPRETED_BLOCKS: tl.constexpr, FOLD: tl.constexpr = False, LAZY: tl.constexpr = False,
                   PAIRED: tl.constexpr = False, ANCHORED: tl.constexpr = False, RETRY: tl.constexpr = False):
    """Query block num_programs(0) - 1 - program_id(0) of head program_id(1) over its listed key blocks and its
    diagonal block. PAIRED: the listed blocks two a step (`_pair_tile`), an odd last one alone. ANCHORED:
    `_anchored_blocks`; where a weight overflowed (a score ~100 above the anchors' maximum, in log2 units, with
    bfloat16 values; 16 with float16, as P is rounded to the value dtype) it sets the query block's flag at
    overflow_ptr, and a RETRY launch redoes the flagged ones with the running maximum (FOLD)."""
    block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last) query blocks first
    head = tl.program_id(1).to(tl.int64)  # batch * q_heads + q_head
    row = head * blocks + block
    if RETRY:
        if tl.load(overflow_ptr + row) == 0:
            return
    kv_head = (head // Q_HEADS) * (Q_HEADS // GROUP) + (head % Q_HEADS) // GROUP
    offs_m = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (head * tokens + offs_m[:, None]) * D + offs_d[None, :], mask=offs_m[:, None] < tokens,
                other=0.0)
    count = tl.load(counts_ptr + row)
    picks = picks_ptr + row * blocks
    if ANCHORED:
        m_i, l_i, acc = _anchored_blocks(q, offs_m, block, row, count, picks, diagonal_ptr, k_ptr, v_ptr, kv_head,
                                         tokens, scale, D, BLOCK, INTERPRETED_BLOCKS)
        # not `< inf` only: inf - inf in the accumulator is NaN, which compares false
        overflowed = tl.sum((~(l_i < 3.0e38)).to(tl.int32)) + tl.sum((~(tl.abs(acc) < 3.0e38)).to(tl.int32))
        tl.store(overflow_ptr + row, (overflowed > 0).to(tl.int8))
    else:
        m_i, l_i, acc = _online_blocks(q, offs_m, block, row, count, picks, diagonal_ptr, k_ptr, v_ptr, kv_head,
                                       tokens, scale, D, BLOCK, INTERPRETED_BLOCKS, FOLD, LAZY, PAIRED)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (head * tokens + offs_m[:, None]) * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < tokens)


def block_lists(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal block mask [..., blocks, blocks] as the kernel walks it: per query block, the selected key blocks
    below the diagonal in ascending order (int32 [..., blocks, blocks], the first `counts` valid, zeros after), their
    counts (int32 [..., blocks]) and whether the diagonal block is selected (int8 [..., blocks])."""
    blocks = block_mask.shape[-1]
    below = block_mask & torch.ones(blocks, blocks, dtype=torch.bool, device=block_mask.device).tril(-1)
    # each selected block to its rank among the row's selected ones (a scan, not a sort); the rest to a spare column
    slots = torch.where(below, below.cumsum(-1, dtype=torch.int32) - 1, blocks).long()
    ids = torch.arange(blocks, dtype=torch.int32, device=block_mask.device).expand_as(slots)
    picks = torch.zeros(*below.shape[:-1], blocks + 1, dtype=torch.int32, device=block_mask.device)
    picks = picks.scatter_(-1, slots, ids)[..., :blocks].contiguous()
    return picks, below.sum(-1, dtype=torch.int32), block_mask.diagonal(dim1=-2, dim2=-1).to(torch.int8)


def sparse_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                   scale: float, block: int = 64, launch: dict | None = None, lists: tuple | None = None
                   ) -> torch.Tensor:
    """`reference.block_sparse_attention` in Triton: 16-bit query/key/value [batch, heads, tokens, dim] (GQA),
    block_mask [batch, q_heads, blocks, blocks]; output [batch, q_heads, tokens, dim] in the value dtype. Only the
    selected blocks are read: the mask becomes per-query-block lists of key blocks (`block_lists`; `lists`: those of
    the mask, already made, e.g. by `estimate.pick_blocks_triton`)."""
    return sparse_prefill_flagged(query, key, value, block_mask, scale, block, launch, lists)[0]


def sparse_prefill_flagged(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                           scale: float, block: int = 64, launch: dict | None = None, lists: tuple | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sparse_prefill`, and with ANCHORED (the default) the query blocks redone with the running maximum (int8
    [batch, q_heads, blocks], 1 where the anchored weights overflowed; else, `launch={"ANCHORED": False}`, None)."""
    batch, q_heads, tokens, dim = query.shape
    blocks = -(-tokens // block)
    if q_heads % key.shape[1] or block_mask.shape != (batch, q_heads, blocks, blocks):
        raise ValueError(f"sparse_prefill: q_heads must be a multiple of kv_heads and the mask [batch, q_heads, "
                         f"{blocks}, {blocks}], got {tuple(block_mask.shape)}")
    picks, counts, diagonal = lists if lists is not None else block_lists(block_mask.bool())
    out = torch.empty(batch, q_heads, tokens, dim, device=query.device, dtype=value.dtype)
    interpreted = blocks if os.environ.get("TRITON_INTERPRET") == "1" else 0
    # 128k tokens, layer 15 tiled at 23% of the blocks: FOLD 11.99 -> 11.48 ms (H200; LAZY 12.15, PAIRED 12.50),
    # ANCHORED 11.67 -> 10.21 (H100; benchmarks/results/sparse_prefill_h{200,100}_captured_int4_sum_g097_r4*.md)
    launch = launch or {}
    options = {"num_warps": 8 if block >= 128 else 4, "num_stages": 2 if block >= 128 else 3, "FOLD": True,
               "ANCHORED": not (launch.get("LAZY") or launch.get("PAIRED")), **launch}  # LAZY, PAIRED: not anchored
    anchored = bool(options["ANCHORED"])
    if anchored and (options.get("LAZY") or options.get("PAIRED")):
        raise ValueError(f"sparse_prefill: ANCHORED replaces LAZY and PAIRED (one of them), got {launch}")
    overflow = torch.zeros(batch * q_heads * blocks if anchored else 1, dtype=torch.int8, device=query.device)
    operands = (query.contiguous(), key.contiguous(), value.contiguous(), picks, counts, diagonal, out, overflow,
                tokens, blocks, scale * LOG2E)
    shape = dict(Q_HEADS=q_heads, GROUP=q_heads // key.shape[1], D=dim, BLOCK=block, INTERPRETED_BLOCKS=interpreted)
    _sparse_kernel[(blocks, batch * q_heads)](*operands, **shape, **options)
    if anchored:  # the query blocks whose weights overflowed, again with the running maximum (no host sync)
        retry = {name: value for name, value in options.items() if name in ("num_warps", "num_stages")}
        _sparse_kernel[(blocks, batch * q_heads)](*operands, **shape, FOLD=True, RETRY=True, **retry)
    return out, overflow.view(batch, q_heads, blocks) if anchored else None
