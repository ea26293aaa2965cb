"""Decode kernels for 16-bit queries over float16/bfloat16 and scaled float8 pages (`packed_decode` reads KIVI's
and KV4's packed pages).

`decode.paged_decode` sends a part here when the query is 16-bit and the pages are of these kinds; the general
kernel in `decode` reads the rest (float32 models). Both compute `reference.paged_attention`.

What makes them faster than the general kernel (measured with Nsight Compute on an H200, `benchmarks/decode_kernel.py`):
pages are loaded in their own dtype straight into the dot products (no float32 round trip), keys in the transposed
layout the dot wants: about half the registers, so twice the blocks per multiprocessor, and the loads pipeline.
Float8 pages are pipelined like the others (checked offline: `benchmarks/inspect_kernel.py` compiles for sm_90
without a GPU). They were slow because their pages held 16 tokens: `fp8` now defaults to 64-token pages, 0.49 ->
0.26 ms at batch 8 x 32k. Smaller pages are read several per step (`paged_decode(tile_tokens=64)`, the default: the
same shared memory and asynchronous copies as 64-token pages): on an H200, 16-token bf16 pages 0.42 -> 0.28 ms (as
fast as 64-token pages), 16-token float8 pages 0.49 -> 0.30 ms.

Float8 pages use float16 dot products for the scores whatever the query's 16-bit type (their scales are float16):
queries beyond float16's range (|q| > 65504) are not supported there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import empty_state, page_rows, query_tile, softmax_step, split_page_ids, store_stats


@triton.jit
def _token_scale(ptr, token, page, valid, P: tl.constexpr, SCALED: tl.constexpr, TILE: tl.constexpr):
    """float8 pages' scales of a tile's slots: one per token (SCALED 1) or their page's one (SCALED 2); 0 where
    invalid (a free page's scale may be anything, and 0 * inf is NaN)."""
    if SCALED == 1 and TILE == 1:  # a scalar base and 32-bit offsets, as for the pages
        scale = tl.load(ptr + page * P + tl.arange(0, P), mask=valid, other=0.0).to(tl.float32)
    elif SCALED == 1:
        scale = tl.load(ptr + token, mask=valid, other=0.0).to(tl.float32)
    else:
        scale = tl.where(valid, tl.load(ptr + page).to(tl.float32), 0.0)
    return scale


@triton.jit
def _tile_slots(table_ptr, row, width, first_page, length, P: tl.constexpr, TILE: tl.constexpr, ids=0, i=0,
                PAGE_IDS: tl.constexpr = False):
    """TILE consecutive pages of the row as one tile of TILE * P slots: each slot's page id (one scalar for one
    page), its token index in the pool (page * P + offset), and whether it holds one of the row's tokens (a row's
    pages are full but its last). PAGE_IDS: the ids come from `ids`, the split's (`common.split_page_ids`), this
    being the split's step i, not from a load."""
    if TILE == 1:
        page, valid = page_rows(table_ptr, row, width, first_page, length, P, ids, i, PAGE_IDS)
        token = page * P + tl.arange(0, P)
    else:
        slots = tl.arange(0, TILE * P)
        if PAGE_IDS:  # step i's TILE ids, each spread over its page's P slots
            steps = tl.reshape(ids, [ids.shape[0] // TILE, TILE])
            mine = tl.sum(tl.where(tl.arange(0, ids.shape[0] // TILE)[:, None] == i, steps, 0), axis=0)
            page = tl.reshape(tl.broadcast_to(mine[:, None], [TILE, P]), [TILE * P]).to(tl.int64)
        else:
            index = first_page + slots // P
            page = tl.load(table_ptr + row * width + index, mask=index * P < length, other=0).to(tl.int64)
        token = page * P + slots % P
        valid = first_page * P + slots < length
    return page, token, valid


@triton.jit
def full_pages_kernel(q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, vs_ptr, m_ptr, l_ptr, acc_ptr,
                      width, splits, qpos_ptr, window, scale,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      PAGES_PER_SPLIT: tl.constexpr, WINDOWED: tl.constexpr, SCALED: tl.constexpr,
                      TILE: tl.constexpr = 1, PAGE_IDS: tl.constexpr = False):
    """Pages of 16-bit K and V, read in their dtype (the query is cast to it); or float8 pages (SCALED 1: a scale
    per token, 2: per page), widened to float16 exactly, with the key scales applied to the scores' columns and the
    value scales to the probabilities: k·q = scale_t (k8·q), Σ p_t v_t = top Σ (p_t scale_t / top) v8_t, top the
    tile's largest value scale. TILE pages are read per step (small pages: fewer, larger steps). PAGE_IDS: the
    split's page ids load before the loop (`common.split_page_ids`; offline for sm_90 the pages' buffers go from
    one to two, as in the packed kernels; not yet timed here, so off by default)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(len_ptr + row)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, P)
    DOT: tl.constexpr = tl.float16 if SCALED else k_ptr.dtype.element_ty
    q = query_tile(q_ptr, row, G, BLOCK_G, D).to(DOT)
    m_i, l_i, acc = empty_state(BLOCK_G, D)
    first = split * PAGES_PER_SPLIT
    if first * P < length:  # the loop itself has no branch, so the compiler pipelines its loads
        ids = split_page_ids(table_ptr, row, width, first, length, P, PAGES_PER_SPLIT, PAGE_IDS)
        for i in range(PAGES_PER_SPLIT // TILE):
            page, token, valid = _tile_slots(table_ptr, row, width, first + i * TILE, length, P, TILE, ids, i,
                                             PAGE_IDS)
            if WINDOWED:
                valid = valid & (tl.load(pos_ptr + token) > tl.load(qpos_ptr) - window)
            if TILE == 1:  # a scalar base and 32-bit offsets: fewer registers than an address per slot
                k_t = tl.load(k_ptr + page * P * D + offs_p[None, :] * D + offs_d[:, None], mask=valid[None, :],
                              other=0.0)
                v = tl.load(v_ptr + page * P * D + offs_p[:, None] * D + offs_d[None, :], mask=valid[:, None],
                            other=0.0)
            else:
                k_t = tl.load(k_ptr + token[None, :] * D + offs_d[:, None], mask=valid[None, :], other=0.0)
                v = tl.load(v_ptr + token[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, k_t.to(DOT))
            if SCALED:
                s = s * _token_scale(ks_ptr, token, page, valid, P, SCALED, TILE)[None, :]
            p, alpha, m_i, l_i = softmax_step(s, valid[None, :], m_i, l_i, scale)
            if SCALED:  # p × scale_t over the tile's largest scale: float16 normals, not subnormals (scales ~1e-4)
                v_scale = _token_scale(vs_ptr, token, page, valid, P, SCALED, TILE)
                top = tl.max(v_scale, axis=0)
                top = tl.where(top > 0, top, 1.0)
                acc = acc * alpha[:, None] + top * tl.dot((p * (v_scale / top)[None, :]).to(DOT), v.to(DOT))
            else:
                acc = tl.dot(p.to(DOT), v, acc * alpha[:, None])
    out = store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G, BLOCK_G)
    tl.store(acc_ptr + out[:, None] * D + offs_d[None, :], acc, mask=offs_g[:, None] < G)
