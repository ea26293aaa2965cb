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
  1024 is subtracted and the scale and zero applied in float16 (paired half-precision instructions).
- Value scales, one per token and group of channels, are read as [page] vectors and selected per channel in
  registers, instead of a gather of [page, channels] addresses.
Float8 and KV4 pages came here later. On an H200 they stay about twice as slow per byte as 16-bit pages: Nsight
Compute shows their loads are not pipelined through shared memory (8.7 KB per block against 38.9 KB for bf16
pages; 44% of the stalls wait on loads; `benchmarks/results/ncu_decode_h200/fast_*.txt`). Widening float8 by moving
bits instead of Triton's conversion was measured slower (0.56 against 0.49 ms) and not kept.

Packed and float8 pages use float16 dot products for the scores whatever the query's 16-bit type (their scales
are float16): queries beyond float16's range (|q| > 65504) are not supported there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import empty_state, padded_page_rows, page_rows, query_tile, softmax_step, store_stats, window_mask


@triton.jit
def _token_scale(ptr, page, valid, P: tl.constexpr, SCALED: tl.constexpr):
    """float8 pages' scales as a [P] row: one per token (SCALED 1) or the page's one (SCALED 2); 0 where invalid
    (a free page's scale may be anything, and 0 * inf is NaN)."""
    if SCALED == 1:
        scale = tl.load(ptr + page * P + tl.arange(0, P), mask=valid, other=0.0).to(tl.float32)
    else:
        scale = tl.where(valid, tl.load(ptr + page).to(tl.float32), 0.0)
    return scale


@triton.jit
def full_pages_kernel(q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, vs_ptr, m_ptr, l_ptr, acc_ptr,
                      width, splits, qpos_ptr, window, scale,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      PAGES_PER_SPLIT: tl.constexpr, WINDOWED: tl.constexpr, SCALED: tl.constexpr):
    """Pages of 16-bit K and V, read in their dtype (the query is cast to it); or float8 pages (SCALED 1: a scale
    per token, 2: per page), widened to float16 exactly, with the key scales applied to the scores' columns and the
    value scales to the probabilities: k·q = scale_t (k8·q), Σ p_t v_t = top Σ (p_t scale_t / top) v8_t, top the
    page's largest value scale."""
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
        for i in range(PAGES_PER_SPLIT):
            page, valid = page_rows(table_ptr, row, width, first + i, length, P)
            valid = window_mask(valid, pos_ptr, page, qpos_ptr, window, P, WINDOWED)
            k_t = tl.load(k_ptr + page * P * D + offs_p[None, :] * D + offs_d[:, None], mask=valid[None, :], other=0.0)
            v = tl.load(v_ptr + page * P * D + offs_p[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, k_t.to(DOT))
            if SCALED:
                s = s * _token_scale(ks_ptr, page, valid, P, SCALED)[None, :]
            p, alpha, m_i, l_i = softmax_step(s, valid[None, :], m_i, l_i, scale)
            if SCALED:  # p × scale_t over the page's largest scale: float16 normals, not subnormals (scales ~1e-4)
                v_scale = _token_scale(vs_ptr, page, valid, P, SCALED)
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
def _value_field(codes, vs_ptr, vz_ptr, vch_ptr, page, token_stat, channels, valid, r: tl.constexpr,
                 BITS: tl.constexpr, NVG: tl.constexpr, VG: tl.constexpr, D: tl.constexpr,
                 VALUE_CHANNEL: tl.constexpr):
    """Values of bit field r, [P, J]: a scale and zero per token and group of VG channels, chosen per channel by
    selects over the NVG groups (the channels of field r are `channels + r`); VALUE_CHANNEL: times the page's
    factor per channel (ZipCache's channel-separable values)."""
    chan = channels[None, :] + r
    scale = tl.load(vs_ptr + token_stat).to(tl.float16)[:, None] + tl.zeros(chan.shape, tl.float16)
    zero = tl.load(vz_ptr + token_stat).to(tl.float16)[:, None] + tl.zeros(chan.shape, tl.float16)
    for g in tl.static_range(1, NVG):
        scale = tl.where(chan >= g * VG, tl.load(vs_ptr + token_stat + g).to(tl.float16)[:, None], scale)
        zero = tl.where(chan >= g * VG, tl.load(vz_ptr + token_stat + g).to(tl.float16)[:, None], zero)
    if VALUE_CHANNEL:
        factor = tl.load(vch_ptr + page * D + chan).to(tl.float16)
        scale, zero = scale * factor, zero * factor
    return tl.where(valid[:, None], _field(codes, r, BITS) * scale + zero, 0.0).to(tl.float16)


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
def _query_field(q_ptr, row, offs_g, channels, r: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    q = tl.load(q_ptr + row * G * D + offs_g[:, None] * D + channels[None, :] + r, mask=offs_g[:, None] < G, other=0.0)
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
    offs_g = tl.arange(0, BLOCK_G)
    if PAGE_TOKENS:
        offs_p = tl.arange(0, P_PAD)
    else:
        offs_p = tl.arange(0, P)
    channels = tl.arange(0, J) * PER_BYTE  # the first channel of each byte
    q0 = _query_field(q_ptr, row, offs_g, channels, 0, G, D)
    q1 = _query_field(q_ptr, row, offs_g, channels, 1 % PER_BYTE, G, D)
    q2 = _query_field(q_ptr, row, offs_g, channels, 2 % PER_BYTE, G, D)
    q3 = _query_field(q_ptr, row, offs_g, channels, 3 % PER_BYTE, G, D)
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
            p = p.to(tl.float16)
            token_stat = page * STAT * NVG + offs_p * NVG
            acc0 = tl.dot(p, _value_field(vc, vs_ptr, vz_ptr, vch_ptr, page, token_stat, channels, valid, 0, BITS,
                                          NVG, VG, D, VALUE_CHANNEL), acc0 * alpha[:, None])
            if PER_BYTE >= 2:
                acc1 = tl.dot(p, _value_field(vc, vs_ptr, vz_ptr, vch_ptr, page, token_stat, channels, valid, 1,
                                              BITS, NVG, VG, D, VALUE_CHANNEL), acc1 * alpha[:, None])
            if PER_BYTE == 4:
                acc2 = tl.dot(p, _value_field(vc, vs_ptr, vz_ptr, vch_ptr, page, token_stat, channels, valid, 2,
                                              BITS, NVG, VG, D, VALUE_CHANNEL), acc2 * alpha[:, None])
                acc3 = tl.dot(p, _value_field(vc, vs_ptr, vz_ptr, vch_ptr, page, token_stat, channels, valid, 3,
                                              BITS, NVG, VG, D, VALUE_CHANNEL), acc3 * alpha[:, None])
    out = store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G, BLOCK_G)
    out_row = acc_ptr + out[:, None] * D + channels[None, :]
    g_mask = offs_g[:, None] < G
    tl.store(out_row, acc0, mask=g_mask)
    if PER_BYTE >= 2:
        tl.store(out_row + 1, acc1, mask=g_mask)
    if PER_BYTE == 4:
        tl.store(out_row + 2, acc2, mask=g_mask)
        tl.store(out_row + 3, acc3, mask=g_mask)
