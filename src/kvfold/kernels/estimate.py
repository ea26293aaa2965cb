"""The low-bit estimate of a causal prefill's block attention (`pattern.lowbit_block_mass`) in Triton.

One program per (query block, KV head), or `QUERY_BLOCKS` consecutive query blocks (default 2): the sampled rows
of the blocks' GQA group of query heads form one tile (block q, head g, row r at tile row (q * G_PAD + g) * rows +
r, heads padded to a power of two, the tile to >= 16 rows), so every key block is loaded once for all of them.
Integer dot products of the codes (int8 tensor cores; 4-bit codes are held in int8: Hopper has no int4 MMA). The
anchors come first (the sink block, then each row's own block): their maximum and sum; then one pass over the
visible key blocks sums each (query block, head)'s relative weights per key block into the mass. Nothing of size
tokens × tokens is written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pattern import lowbit_operands
from .prefill import LOG2E

# Two query blocks a program: a 64-row tile, 16 rows a warp (wgmma), row reductions within a warp. On an H200 at 128k
# (9 / 3 heads, head_dim 64; benchmarks/results/sparse_prefill_h200_captured_int4_*.md): 8.2 ms, against 9.9 for
# one block a program at 2 warps and 8.6 for four at 4 or 8 warps; two key blocks a step were within noise (8.1).
ESTIMATE_LAUNCH = {"num_warps": 4, "num_stages": 3, "QUERY_BLOCKS": 2}


@triton.jit
def _block_scores(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, D: tl.constexpr, BLOCK: tl.constexpr):
    """Scores (log2 units) of the tile's rows against key block j; keys after a row's position are -inf."""
    keys = j * BLOCK + tl.arange(0, BLOCK)
    inside = keys < tokens
    codes = tl.load(kc_ptr + (kv * tokens + keys[:, None]) * D + tl.arange(0, D)[None, :], mask=inside[:, None],
                    other=0)
    key_scale = tl.load(ks_ptr + kv * tokens + keys, mask=inside, other=0.0)
    scores = tl.dot(q, tl.trans(codes)).to(tl.float32) * q_scale[:, None] * key_scale[None, :]
    return tl.where(keys[None, :] <= positions[:, None], scores, float("-inf"))


@triton.jit
def _anchor_stats(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, anchor, m_i, l_i, D: tl.constexpr,
                  BLOCK: tl.constexpr, MAX: tl.constexpr):
    """Key block j into the maximum and sum of the rows it anchors (`anchor` [rows]); MAX: the maximum alone (the
    sum stays 1)."""
    scores = _block_scores(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, D, BLOCK)
    scores = tl.where(anchor[:, None], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: the sink block comes first, key 0 is always visible
    if MAX:
        return m_new, l_i
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(scores - m_new[:, None]), axis=1)


@triton.jit
def _store_mass(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, l_i, out, stored, ROWS: tl.constexpr,
                D: tl.constexpr, BLOCK: tl.constexpr, MAX: tl.constexpr):
    """Each (query block, head)'s weights in key block j relative to its rows' anchors, summed over its rows, at
    out + j (exponents capped at 64 above the anchors' maximum: no overflow). MAX: the block's largest score, one
    exponential a row."""
    scores = _block_scores(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, D, BLOCK)
    if MAX:
        row_mass = tl.exp2(tl.minimum(tl.max(scores, axis=1) - m_i, 64.0))
    else:
        row_mass = tl.sum(tl.exp2(tl.minimum(scores - m_i[:, None], 64.0)), axis=1) / l_i
    tl.store(out + j, tl.sum(tl.reshape(row_mass, [stored.shape[0], ROWS]), axis=1), mask=stored)


@triton.jit
def _lowbit_mass_kernel(qc_ptr, qs_ptr, kc_ptr, ks_ptr, mass_ptr, tokens, blocks, scale_log2,
                        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, G_PAD: tl.constexpr,
                        D: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED_BLOCKS: tl.constexpr,
                        QUERY_BLOCKS: tl.constexpr = 1, MAX: tl.constexpr = False):
    """MAX: the `reduce="max"` weights."""
    first = (tl.num_programs(0) - 1 - tl.program_id(0)) * QUERY_BLOCKS  # the longest (last) query blocks first
    kv = tl.program_id(1).to(tl.int64)  # batch * kv_heads + kv_head
    tile = tl.arange(0, QUERY_BLOCKS * G_PAD * ROWS)
    block, head, row = first + tile // (G_PAD * ROWS), tile // ROWS % G_PAD, tile % ROWS
    real = (head < GROUP) & (block < blocks)
    positions = tl.minimum(block * BLOCK + (row + 1) * (BLOCK // ROWS) - 1, tokens - 1)
    sampled = (kv * blocks + block) * GROUP * ROWS + head * ROWS + row  # [batch, kv_heads, blocks, group, rows]
    q = tl.load(qc_ptr + sampled[:, None] * D + tl.arange(0, D)[None, :], mask=real[:, None], other=0)
    q_scale = tl.load(qs_ptr + sampled, mask=real, other=0.0) * scale_log2
    m_i = tl.full([QUERY_BLOCKS * G_PAD * ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([QUERY_BLOCKS * G_PAD * ROWS], tl.float32)
    sink = block >= 0  # every row
    m_i, l_i = _anchor_stats(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, 0, sink, m_i, l_i, D, BLOCK, MAX)
    for d in tl.static_range(QUERY_BLOCKS):  # each row's own block (block 0's is the sink, already in)
        if (first + d > 0) & (first + d < blocks):
            m_i, l_i = _anchor_stats(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, first + d, block == first + d,
                                     m_i, l_i, D, BLOCK, MAX)
    pairs = tl.arange(0, QUERY_BLOCKS * G_PAD)  # (query block, head) pairs
    pair_block, pair_head = first + pairs // G_PAD, pairs % G_PAD
    q_head = (kv // KV_HEADS) * KV_HEADS * GROUP + (kv % KV_HEADS) * GROUP + pair_head
    out = mass_ptr + (q_head * blocks + pair_block) * blocks
    stored = (pair_head < GROUP) & (pair_block < blocks)
    end = tl.minimum(first + QUERY_BLOCKS, blocks)  # key blocks [0, end) are visible to some row
    if INTERPRETED_BLOCKS:  # Triton's interpreter loops only to constants
        for j in range(0, INTERPRETED_BLOCKS):
            if j < end:
                _store_mass(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, l_i, out, stored, ROWS, D,
                            BLOCK, MAX)
    else:
        for j in range(0, end):
            _store_mass(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, l_i, out, stored, ROWS, D, BLOCK,
                        MAX)


def lowbit_block_mass_triton(query: torch.Tensor, key: torch.Tensor, scale: float, block: int = 64, bits: int = 4,
                             rows: int = 8, reduce: str = "sum", launch: dict | None = None) -> torch.Tensor:
    """`pattern.lowbit_block_mass` in Triton: query/key [batch, heads, tokens, dim] (GQA, head_dim a power of two
    >= 32: int8 dot products reduce over >= 32), float32 [batch, q_heads, blocks, blocks] (zero above the
    diagonal). `launch` overrides `ESTIMATE_LAUNCH` (num_warps, num_stages, QUERY_BLOCKS)."""
    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    blocks = -(-tokens // block)
    if q_heads % kv_heads or dim < 32 or dim & (dim - 1):
        raise ValueError(f"low-bit estimate kernel: q_heads must be a multiple of kv_heads and head_dim a power of "
                         f"two >= 32, got {q_heads}, {kv_heads}, {dim}")
    q_codes, q_scales, k_codes, k_scales, _ = lowbit_operands(query, key, block, bits, rows, reduce)
    # [batch, q_heads, blocks * rows] -> [batch, kv_heads, blocks, group, rows]: a program's tile is contiguous
    regroup = lambda x: x.unflatten(1, (kv_heads, group)).unflatten(3, (blocks, rows)).transpose(2, 3)  # noqa: E731
    q_codes, q_scales = regroup(q_codes).contiguous(), regroup(q_scales).contiguous()
    mass = torch.zeros(batch, q_heads, blocks, blocks, device=query.device)
    g_pad = max(triton.next_power_of_2(group), 16 // rows)
    interpreted = blocks if os.environ.get("TRITON_INTERPRET") == "1" else 0
    options = {**ESTIMATE_LAUNCH, **(launch or {})}
    _lowbit_mass_kernel[(triton.cdiv(blocks, options.get("QUERY_BLOCKS", 1)), batch * kv_heads)](
        q_codes, q_scales, k_codes.contiguous(), k_scales.contiguous(), mass, tokens, blocks, scale * LOG2E,
        KV_HEADS=kv_heads, GROUP=group, ROWS=rows, G_PAD=g_pad, D=dim, BLOCK=block,
        INTERPRETED_BLOCKS=interpreted, MAX=reduce == "max", **options)
    return mass
