"""Decode kernels for 16-bit queries: float16/bfloat16 and scaled float8 pages, and packed pages (KIVI, KV4).

`decode.paged_decode` sends a part here when the query is 16-bit and the pages are of these kinds; the general
kernel in `decode` reads the rest (float32 models; packed rows too narrow for a dot product on a GPU). Both compute
`reference.paged_attention`.

What makes them faster than the general kernel (measured with Nsight Compute on an H200, `benchmarks/decode_kernel.py`):
- Pages are loaded in their own dtype straight into the dot products (no float32 round trip), keys in the transposed
  layout the dot wants: about half the registers, so twice the blocks per multiprocessor, and the loads pipeline.
- Packed pages are never re-laid out in registers: the bytes hold channels `c * per_byte + r` in bit field r, so the
  scores are a sum of `per_byte` dot products, one per bit field, each over every `per_byte`-th channel of the query
  (and the output is assembled the same way). The general kernel's interleave (join + reshape) cost a layout
  conversion through shared memory per page.
- Codes become float16 by a bit trick, not a conversion: 0x6400 | c is the float16 1024 + c, exact for c < 1024, so
  1024 is subtracted (KIVI keys then take their scale and zero in float16: paired half-precision instructions).
- Packed values never pass through shared memory as float16: the value scales and zeros ride on the probabilities
  (Σ_t p_t (c_t s_t + z_t) = top Σ_t (p_t s_t / top) c_t + Σ_t p_t z_t), so the codes go from shared memory into
  the dot product as they are, like the keys. Values have a scale per group of channels; the query rows are
  repeated once per group in the MMA tile's spare rows (GQA 4 fills 4 of its 16), so one dot product serves every
  group. Measured on an H200: kivi:2 0.45 -> 0.34 ms, kv4:2 0.51 -> 0.39 ms, kivi:4 0.38 -> 0.37 ms.
Float8 pages are pipelined like the others (checked offline: `benchmarks/inspect_kernel.py` compiles for sm_90
without a GPU). They were slow because their pages held 16 tokens: `fp8` now defaults to 64-token pages, 0.49 ->
0.26 ms at batch 8 x 32k. Smaller pages are read several per step (`paged_decode(tile_tokens=64)`, the default: the
same shared memory and asynchronous copies as 64-token pages): on an H200, 16-token bf16 pages 0.42 -> 0.28 ms (as
fast as 64-token pages), 16-token float8 pages 0.49 -> 0.30 ms.

Packed and float8 pages use float16 dot products for the scores whatever the query's 16-bit type (their scales
are float16): queries beyond float16's range (|q| > 65504) are not supported there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import empty_state, padded_page_rows, page_rows, query_tile, softmax_step, store_stats, window_mask


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
def _tile_slots(table_ptr, row, width, first_page, length, P: tl.constexpr, TILE: tl.constexpr):
    """TILE consecutive pages of the row as one tile of TILE * P slots: each slot's page id (one scalar for one
    page), its token index in the pool (page * P + offset), and whether it holds one of the row's tokens (a row's
    pages are full but its last)."""
    if TILE == 1:
        page, valid = page_rows(table_ptr, row, width, first_page, length, P)
        token = page * P + tl.arange(0, P)
    else:
        slots = tl.arange(0, TILE * P)
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
                      TILE: tl.constexpr = 1):
    """Pages of 16-bit K and V, read in their dtype (the query is cast to it); or float8 pages (SCALED 1: a scale
    per token, 2: per page), widened to float16 exactly, with the key scales applied to the scores' columns and the
    value scales to the probabilities: k·q = scale_t (k8·q), Σ p_t v_t = top Σ (p_t scale_t / top) v8_t, top the
    tile's largest value scale. TILE pages are read per step (small pages: fewer, larger steps)."""
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
        for i in range(PAGES_PER_SPLIT // TILE):
            page, token, valid = _tile_slots(table_ptr, row, width, first + i * TILE, length, P, TILE)
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


@triton.jit
def _field(codes, r: tl.constexpr, BITS: tl.constexpr):
    """Bit field r of each byte as float16, exactly: 0x6400 | c is the float16 1024 + c."""
    c = ((codes >> (r * BITS)) & ((1 << BITS) - 1)).to(tl.uint16)
    return (c | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _key_field(codes, ks_ptr, kz_ptr, channel, r: tl.constexpr, BITS: tl.constexpr):
    """Keys of bit field r, [P, J]: per-channel scale and zero (KIVI)."""
    scale = tl.load(ks_ptr + channel + r).to(tl.float16)
    zero = tl.load(kz_ptr + channel + r).to(tl.float16)
    return (_field(codes, r, BITS) * scale[None, :] + zero[None, :]).to(tl.float16)


@triton.jit
def _smoothed_query(q, ksm_ptr, channel, r: tl.constexpr):
    """KV4: the query field times the page's channel factors λ (k = (c * scale_t + zero_t) * λ)."""
    return (q.to(tl.float32) * tl.load(ksm_ptr + channel + r).to(tl.float32)[None, :]).to(tl.float16)


@triton.jit
def _value_weights(p, vs_ptr, vz_ptr, token_stat, valid, group, rows_ok):
    """Values are c * s_t + z_t per token and group of VG channels, so a group's share of the output is
    top Σ_t (p_t s_t / top) c_t + Σ_t p_t z_t. Row r of the tile serves value group `group[r]` (the query rows are
    repeated once per group in the MMA tile's spare rows), so one dot product covers every group. Returns the
    probabilities times the scales over the row's largest scale (float16 normals), that largest scale, and the
    zeros' share [BLOCK_G]."""
    mask = valid[None, :] & rows_ok[:, None]
    v_scale = tl.load(vs_ptr + token_stat[None, :] + group[:, None], mask=mask, other=0.0).to(tl.float32)
    v_zero = tl.load(vz_ptr + token_stat[None, :] + group[:, None], mask=mask, other=0.0).to(tl.float32)
    top = tl.max(v_scale, axis=1)
    top = tl.where(top > 0, top, 1.0)
    return (p * (v_scale / top[:, None])).to(tl.float16), top, tl.sum(p * v_zero, axis=1)


@triton.jit
def _value_update(weights, top, zeros, codes, vch_ptr, page, channels, r: tl.constexpr, BITS: tl.constexpr,
                  D: tl.constexpr, VALUE_CHANNEL: tl.constexpr):
    """This page's share of the output channels of bit field r, [BLOCK_G, J]: the codes go straight into the dot
    product. VALUE_CHANNEL: times the page's factor per channel (ZipCache's channel-separable values)."""
    update = top[:, None] * tl.dot(weights, _field(codes, r, BITS)) + zeros[:, None]
    if VALUE_CHANNEL:
        update = update * tl.load(vch_ptr + page * D + channels + r).to(tl.float32)[None, :]
    return update


@triton.jit
def _token_key_scores(kc, q0, q1, q2, q3, ksm_ptr, channel, BITS: tl.constexpr, PER_BYTE: tl.constexpr):
    """KV4 keys: Σ over bit fields of (qλ)·codes [BLOCK_G, P], and Σ qλ [BLOCK_G] (what the zero multiplies)."""
    sq = _smoothed_query(q0, ksm_ptr, channel, 0)
    s = tl.dot(sq, tl.trans(_field(kc, 0, BITS)))
    q_sum = tl.sum(sq.to(tl.float32), axis=1)
    if PER_BYTE >= 2:
        sq = _smoothed_query(q1, ksm_ptr, channel, 1)
        s = tl.dot(sq, tl.trans(_field(kc, 1, BITS)), s)
        q_sum += tl.sum(sq.to(tl.float32), axis=1)
    if PER_BYTE == 4:
        sq = _smoothed_query(q2, ksm_ptr, channel, 2)
        s = tl.dot(sq, tl.trans(_field(kc, 2, BITS)), s)
        q_sum += tl.sum(sq.to(tl.float32), axis=1)
        sq = _smoothed_query(q3, ksm_ptr, channel, 3)
        s = tl.dot(sq, tl.trans(_field(kc, 3, BITS)), s)
        q_sum += tl.sum(sq.to(tl.float32), axis=1)
    return s, q_sum


@triton.jit
def _query_field(q_ptr, row, query, rows_ok, channels, r: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    q = tl.load(q_ptr + row * G * D + query[:, None] * D + channels[None, :] + r, mask=rows_ok[:, None], other=0.0)
    return q.to(tl.float16)


@triton.jit
def kivi_pages_kernel(q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, kz_ptr, ksm_ptr, vs_ptr, vz_ptr,
                      vch_ptr, m_ptr, l_ptr, acc_ptr, width, splits, qpos_ptr, window, scale,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      BITS: tl.constexpr, VG: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr, WINDOWED: tl.constexpr,
                      KEY_TOKEN: tl.constexpr, PAGE_TOKENS: tl.constexpr = 0, P_PAD: tl.constexpr = 0,
                      VALUE_CHANNEL: tl.constexpr = False):
    """Packed pages: codes [P, D * BITS / 8] bytes; values with a scale and zero per token per VG channels. Keys
    with a scale and zero per channel per page (KIVI), or (KEY_TOKEN, QServe's KV4) per token, times the page's
    channel factors λ: then q·k = scale_t Σ (qλ)·c + zero_t Σ qλ, so the codes still go straight into the dots.
    Up to four bit fields per byte, each its own dot product.
    PAGE_TOKENS (ZipCache's mixed pages): each page of the store holds PAGE_TOKENS tokens, of which this part reads
    P slots (any P, padded to the power of two P_PAD): row lengths count the store's tokens (whole pages), and the value
    scales hold PAGE_TOKENS slots a page; VALUE_CHANNEL: the values also have a factor per page and channel."""
    PER_BYTE: tl.constexpr = 8 // BITS
    J: tl.constexpr = D // PER_BYTE
    NVG: tl.constexpr = D // VG
    STAT: tl.constexpr = PAGE_TOKENS if PAGE_TOKENS else P  # slots per page in the value scales
    row = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(len_ptr + row)
    if PAGE_TOKENS:
        length = length // PAGE_TOKENS * P  # whole pages: this part's slots in them
    rows = tl.arange(0, BLOCK_G)  # row r: query r % G, value group r // G
    query, group, rows_ok = rows % G, rows // G, rows < G * NVG
    if PAGE_TOKENS:
        offs_p = tl.arange(0, P_PAD)
    else:
        offs_p = tl.arange(0, P)
    channels = tl.arange(0, J) * PER_BYTE  # the first channel of each byte
    q0 = _query_field(q_ptr, row, query, rows_ok, channels, 0, G, D)
    q1 = _query_field(q_ptr, row, query, rows_ok, channels, 1 % PER_BYTE, G, D)
    q2 = _query_field(q_ptr, row, query, rows_ok, channels, 2 % PER_BYTE, G, D)
    q3 = _query_field(q_ptr, row, query, rows_ok, channels, 3 % PER_BYTE, G, D)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc0 = tl.zeros([BLOCK_G, J], tl.float32)
    acc1 = tl.zeros([BLOCK_G, J], tl.float32)
    acc2 = tl.zeros([BLOCK_G, J], tl.float32)
    acc3 = tl.zeros([BLOCK_G, J], tl.float32)
    first = split * PAGES_PER_SPLIT
    if first * P < length:
        for i in range(PAGES_PER_SPLIT):
            if PAGE_TOKENS:
                page, valid = padded_page_rows(table_ptr, row, width, first + i, length, P, P_PAD)
            else:
                page, valid = page_rows(table_ptr, row, width, first + i, length, P)
                valid = window_mask(valid, pos_ptr, page, qpos_ptr, window, P, WINDOWED)
            code_off = page * P * J + offs_p[:, None] * J + tl.arange(0, J)[None, :]
            kc = tl.load(k_ptr + code_off, mask=valid[:, None], other=0)
            vc = tl.load(v_ptr + code_off, mask=valid[:, None], other=0)
            key_channel = page * D + channels
            if KEY_TOKEN:
                s, q_sum = _token_key_scores(kc, q0, q1, q2, q3, ksm_ptr, key_channel, BITS, PER_BYTE)
                token = page * P + offs_p
                s = s * tl.load(ks_ptr + token).to(tl.float32)[None, :] \
                    + q_sum[:, None] * tl.load(kz_ptr + token).to(tl.float32)[None, :]
            else:
                s = tl.dot(q0, tl.trans(_key_field(kc, ks_ptr, kz_ptr, key_channel, 0, BITS)))
                if PER_BYTE >= 2:
                    s = tl.dot(q1, tl.trans(_key_field(kc, ks_ptr, kz_ptr, key_channel, 1, BITS)), s)
                if PER_BYTE == 4:
                    s = tl.dot(q2, tl.trans(_key_field(kc, ks_ptr, kz_ptr, key_channel, 2, BITS)), s)
                    s = tl.dot(q3, tl.trans(_key_field(kc, ks_ptr, kz_ptr, key_channel, 3, BITS)), s)
            p, alpha, m_i, l_i = softmax_step(s, valid[None, :], m_i, l_i, scale)
            token_stat = page * STAT * NVG + offs_p * NVG
            weights, top, zeros = _value_weights(p, vs_ptr, vz_ptr, token_stat, valid, group, rows_ok)
            acc0 = acc0 * alpha[:, None] + _value_update(weights, top, zeros, vc, vch_ptr, page, channels, 0, BITS, D,
                                                         VALUE_CHANNEL)
            if PER_BYTE >= 2:
                acc1 = acc1 * alpha[:, None] + _value_update(weights, top, zeros, vc, vch_ptr, page, channels, 1, BITS,
                                                             D, VALUE_CHANNEL)
            if PER_BYTE == 4:
                acc2 = acc2 * alpha[:, None] + _value_update(weights, top, zeros, vc, vch_ptr, page, channels, 2, BITS,
                                                             D, VALUE_CHANNEL)
                acc3 = acc3 * alpha[:, None] + _value_update(weights, top, zeros, vc, vch_ptr, page, channels, 3, BITS,
                                                             D, VALUE_CHANNEL)
    store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G, BLOCK_G)  # rows < G: the first group's (all equal)
    out_row = acc_ptr + ((row * splits + split) * G + query)[:, None] * D + channels[None, :]
    mine = rows_ok[:, None] & (group[:, None] == (channels // VG)[None, :])  # each channel from its group's rows
    tl.store(out_row, acc0, mask=mine)
    if PER_BYTE >= 2:
        tl.store(out_row + 1, acc1, mask=mine)
    if PER_BYTE == 4:
        tl.store(out_row + 2, acc2, mask=mine)
        tl.store(out_row + 3, acc3, mask=mine)
