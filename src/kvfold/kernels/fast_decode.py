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
  4- and 8-bit codes are read as 16-bit words (`decode.packed_words`) and unpacked by inline PTX two per
  instruction, as the dot product's operand pairs them in a register; 2-bit bytes are spread to 16-bit lanes first.
  On an H200 (batch 8 x 32k): kivi:4 0.339 -> 0.232 ms at 2 warps, 0.191 ms at one warp (`PACKED_LAUNCH`).
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

from .common import (empty_state, padded_page_rows, page_rows, query_tile, softmax_step, softmax_update,
                     store_stats, window_mask)


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
def _spread_bytes(codes):
    """uint8 codes -> uint16 words of one byte each (GPU): four bytes of a register become two registers of two
    words (prmt), so that `_field` then unpacks two codes per instruction as for 16-bit words."""
    return tl.inline_asm_elementwise("prmt.b32 $0, $2, 0, 0x4140; prmt.b32 $1, $2, 0, 0x4342;", "=r,=r,r", [codes],
                                     dtype=tl.uint16, is_pure=True, pack=4)


@triton.jit
def _field(codes, r: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr, BIASED: tl.constexpr = False):
    """Bit field r of each code word (uint8 or uint16) as float16, exactly: 0x6400 | c is the float16 1024 + c.
    ASM (a GPU, 16-bit words): two words per instruction in one 32-bit register, as the dot product's operand holds
    them. A field at bit `pos` < 8 needs no shift: masked in place under the float16 whose unit is 2**pos
    (exponent (25 - pos) << 10), it reads (1024 >> pos) + c; fields at bits 8..15 shift by 8 first.
    BIASED: leave that offset in (1024 >> pos with ASM, else 1024), for a caller that takes it off a whole dot
    product at once."""
    if ASM:
        POS: tl.constexpr = r * BITS % 8
        SHIFT: tl.constexpr = r * BITS - POS
        MASK: tl.constexpr = (((1 << BITS) - 1) << POS) * 0x10001
        BIAS: tl.constexpr = ((25 - POS) << 10) * 0x10001
        SHIFTED: tl.constexpr = f"shr.b32 t, $1, {SHIFT}; " if SHIFT else "mov.b32 t, $1; "
        if BIASED:
            return tl.inline_asm_elementwise(
                f"{{ .reg .b32 t; {SHIFTED}lop3.b32 $0, t, {MASK}, {BIAS}, 0xea; }}", "=r,r", [codes],
                dtype=tl.float16, is_pure=True, pack=2)
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 t, k; {SHIFTED}lop3.b32 t, t, {MASK}, {BIAS}, 0xea; mov.b32 k, {BIAS}; "
            "sub.f16x2 $0, t, k; }", "=r,r", [codes], dtype=tl.float16, is_pure=True, pack=2)
    c = (codes >> (r * BITS)) & ((1 << BITS) - 1)
    if c.dtype != tl.uint16:
        c = c.to(tl.uint16)
    if BIASED:
        return (c | 0x6400).to(tl.float16, bitcast=True)
    return (c | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _query_fields(q_ptr, row, query, rows_ok, channels, FIELDS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """The query's channels of each bit field (channel w * FIELDS + r of field r), float16 [BLOCK_G, W] each."""
    fields = ()
    for r in tl.static_range(FIELDS):
        q = tl.load(q_ptr + row * G * D + query[:, None] * D + channels[None, :] + r, mask=rows_ok[:, None],
                    other=0.0)
        fields = fields + (q.to(tl.float16),)
    return fields


@triton.jit
def _kivi_scores(kc, qs, ks_ptr, kz_ptr, key_channel, FIELDS: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """KIVI keys (a scale and zero per channel per page): Σ over bit fields of q_r · (c_r * scale + zero)."""
    s = tl.zeros([qs[0].shape[0], kc.shape[0]], tl.float32)
    for r in tl.static_range(FIELDS):
        scale = tl.load(ks_ptr + key_channel + r).to(tl.float16)
        zero = tl.load(kz_ptr + key_channel + r).to(tl.float16)
        key = _field(kc, r, BITS, ASM) * scale[None, :] + zero[None, :]
        s = tl.dot(qs[r], tl.trans(key.to(tl.float16)), s)
    return s


@triton.jit
def _token_key_scores(kc, qs, ksm_ptr, key_channel, FIELDS: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """KV4 keys (k = (c * scale_t + zero_t) * λ): Σ over bit fields of (qλ)·c [BLOCK_G, P], and Σ qλ [BLOCK_G]
    (what the zero multiplies)."""
    s = tl.zeros([qs[0].shape[0], kc.shape[0]], tl.float32)
    q_sum = tl.zeros([qs[0].shape[0]], tl.float32)
    for r in tl.static_range(FIELDS):
        smooth = tl.load(ksm_ptr + key_channel + r).to(tl.float32)
        sq = (qs[r].to(tl.float32) * smooth[None, :]).to(tl.float16)
        s = tl.dot(sq, tl.trans(_field(kc, r, BITS, ASM)), s)
        q_sum += tl.sum(sq.to(tl.float32), axis=1)
    return s, q_sum


@triton.jit
def _value_weights(p, vs_ptr, vz_ptr, token_stat, valid, group, NVG: tl.constexpr):
    """Values are c * s_t + z_t per token and group of VG channels, so a group's share of the output is
    top Σ_t (p_t s_t / top) c_t + Σ_t p_t z_t. Row r of the tile serves value group `group[r]` (the query rows are
    repeated once per group in the MMA tile's spare rows), so one dot product covers every group. The statistics
    are read as NVG vectors over the page's tokens and spread over the rows (a gather of the whole tile cost more
    than the dot products). Returns the probabilities times the scales over the row's largest scale (float16
    normals), that largest scale, and the zeros' share [BLOCK_G]."""
    v_scale = tl.zeros_like(p)
    v_zero = tl.zeros_like(p)
    for g in tl.static_range(NVG):
        scale_g = tl.load(vs_ptr + token_stat + g, mask=valid, other=0.0).to(tl.float32)
        zero_g = tl.load(vz_ptr + token_stat + g, mask=valid, other=0.0).to(tl.float32)
        v_scale = tl.where(group[:, None] == g, scale_g[None, :], v_scale)
        v_zero = tl.where(group[:, None] == g, zero_g[None, :], v_zero)
    top = tl.max(v_scale, axis=1)
    top = tl.where(top > 0, top, 1.0)
    return (p * v_scale * (1.0 / top)[:, None]).to(tl.float16), top, tl.sum(p * v_zero, axis=1)


@triton.jit
def _value_update(weights, top, zeros, weight_sum, codes, vch_ptr, page, channels, r: tl.constexpr,
                  BITS: tl.constexpr, D: tl.constexpr, VALUE_CHANNEL: tl.constexpr, ASM: tl.constexpr,
                  FOLD: tl.constexpr):
    """This page's share of the output channels of bit field r, [BLOCK_G, W]: the codes go straight into the dot
    product. VALUE_CHANNEL: times the page's factor per channel (ZipCache's channel-separable values).
    FOLD: the codes keep their float16 offset b (see `_field`) and Σ_t w_t (b + c_t) - b Σ_t w_t takes it off
    once per row (`weight_sum` Σ_t w_t), not once per code; float32 accumulation keeps Σ w c to ~1e-5."""
    if FOLD:
        if ASM:
            bias = 1024 >> (r * BITS % 8)
        else:
            bias = 1024
        update = top[:, None] * tl.dot(weights, _field(codes, r, BITS, ASM, True)) \
            + (zeros - top * weight_sum * bias)[:, None]
    else:
        update = top[:, None] * tl.dot(weights, _field(codes, r, BITS, ASM)) + zeros[:, None]
    if VALUE_CHANNEL:
        update = update * tl.load(vch_ptr + page * D + channels + r).to(tl.float32)[None, :]
    return update


@triton.jit
def kivi_pages_kernel(q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, kz_ptr, ksm_ptr, vs_ptr, vz_ptr,
                      vch_ptr, m_ptr, l_ptr, acc_ptr, width, splits, qpos_ptr, window, scale,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      BITS: tl.constexpr, VG: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr, WINDOWED: tl.constexpr,
                      KEY_TOKEN: tl.constexpr, PAGE_TOKENS: tl.constexpr = 0, P_PAD: tl.constexpr = 0,
                      VALUE_CHANNEL: tl.constexpr = False, ASM: tl.constexpr = False, FOLD: tl.constexpr = True):
    """Packed pages: codes [P, D * BITS / 8] bytes, read as 16-bit words where a word's fields give each dot >= 16
    channels (`packed_words`), else bytes; values with a scale and zero per token per VG channels. Keys with a
    scale and zero per channel per page (KIVI), or (KEY_TOKEN, QServe's KV4) per token, times the page's channel
    factors λ: then q·k = scale_t Σ (qλ)·c + zero_t Σ qλ, so the codes still go straight into the dots.
    A word of 16 / BITS (or 8 / BITS) bit fields holds channels w * FIELDS + r in field r: one dot product per field.
    PAGE_TOKENS (ZipCache's mixed pages): each page of the store holds PAGE_TOKENS tokens, of which this part reads
    P slots (any P, padded to the power of two P_PAD): row lengths count the store's tokens (whole pages), and the value
    scales hold PAGE_TOKENS slots a page; VALUE_CHANNEL: the values also have a factor per page and channel.
    ASM: unpack with inline PTX (GPU only; Triton's interpreter runs the plain operations). FOLD: value codes keep
    their float16 offset, taken off once per row of each dot product (`_value_update`; on an H200 at batch 8 x
    32k: kivi:4 0.176 -> 0.174 ms, kivi:2 0.191 -> 0.187, kv4:4 0.205 -> 0.201)."""
    FIELDS: tl.constexpr = k_ptr.dtype.element_ty.primitive_bitwidth // BITS
    W: tl.constexpr = D // FIELDS  # words per token
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
    channels = tl.arange(0, W) * FIELDS  # each word's first channel
    qs = _query_fields(q_ptr, row, query, rows_ok, channels, FIELDS, G, D)
    scale_log2 = scale * 1.4426950408889634  # base-2 softmax: one multiply less per score
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    accs = ()
    for r in tl.static_range(FIELDS):
        accs = accs + (tl.zeros([BLOCK_G, W], tl.float32),)
    first = split * PAGES_PER_SPLIT
    if first * P < length:
        for i in range(PAGES_PER_SPLIT):
            if PAGE_TOKENS:
                page, valid = padded_page_rows(table_ptr, row, width, first + i, length, P, P_PAD)
            else:
                page, valid = page_rows(table_ptr, row, width, first + i, length, P)
                valid = window_mask(valid, pos_ptr, page, qpos_ptr, window, P, WINDOWED)
            code_off = page * P * W + offs_p[:, None] * W + tl.arange(0, W)[None, :]
            kc = tl.load(k_ptr + code_off, mask=valid[:, None], other=0)
            vc = tl.load(v_ptr + code_off, mask=valid[:, None], other=0)
            if ASM and FIELDS * BITS == 8:
                kc, vc = _spread_bytes(kc), _spread_bytes(vc)
            key_channel = page * D + channels
            if KEY_TOKEN:
                s, q_sum = _token_key_scores(kc, qs, ksm_ptr, key_channel, FIELDS, BITS, ASM)
                token = page * P + offs_p
                s = s * tl.load(ks_ptr + token).to(tl.float32)[None, :] \
                    + q_sum[:, None] * tl.load(kz_ptr + token).to(tl.float32)[None, :]
            else:
                s = _kivi_scores(kc, qs, ks_ptr, kz_ptr, key_channel, FIELDS, BITS, ASM)
            p, alpha, m_i, l_i = softmax_update(tl.where(valid[None, :], s * scale_log2, float("-inf")), m_i, l_i,
                                                BASE2=True)
            token_stat = page * STAT * NVG + offs_p * NVG
            weights, top, zeros = _value_weights(p, vs_ptr, vz_ptr, token_stat, valid, group, NVG)
            weight_sum = tl.sum(weights.to(tl.float32), axis=1) if FOLD else zeros
            updated = ()
            for r in tl.static_range(FIELDS):
                updated = updated + (accs[r] * alpha[:, None] + _value_update(
                    weights, top, zeros, weight_sum, vc, vch_ptr, page, channels, r, BITS, D, VALUE_CHANNEL, ASM,
                    FOLD),)
            accs = updated
    m_i = m_i * 0.6931471805599453  # back to natural-log units for `combine` (-inf stays -inf)
    store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G, BLOCK_G)  # rows < G: the first group's (all equal)
    out_row = acc_ptr + ((row * splits + split) * G + query)[:, None] * D + channels[None, :]
    for r in tl.static_range(FIELDS):  # each channel from its group's rows
        mine = rows_ok[:, None] & (group[:, None] == ((channels + r) // VG)[None, :])
        tl.store(out_row + r, accs[r], mask=mine)
