"""Decode attention over scaled float8 pages read the way `packed_decode.kivi_columns_kernel` reads packed ones:
the GQA group's queries as the tensor-core tiles' columns (`float8_columns_kernel`, the default for float8 pages
with a scale per token or per page at GQA <= `decode.FLOAT8_COLUMNS_UP_TO`; `fast_decode.full_pages_kernel` reads the
rest). Its meaning is `reference.paged_attention` over the dequantized pages."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import softmax_update, split_item, split_page_ids, store_stats
from .packed_decode import _packed_row, _page_step, _token_stats


@triton.jit
def _float8_field(words, r: tl.constexpr, E5M2: tl.constexpr, ASM: tl.constexpr):
    """Byte r of each 16-bit word of float8 codes as float16, exactly. ASM: the two words of a register (two tokens'
    codes of one channel pair) give their byte r to one paired conversion (prmt gathers them, cvt widens both)."""
    if ASM:
        FORMAT: tl.constexpr = "e5m2x2" if E5M2 else "e4m3x2"
        SELECT: tl.constexpr = "0x20" if r == 0 else "0x31"
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 t; .reg .b16 lo, hi; prmt.b32 t, $1, 0, {SELECT}; mov.b32 {{lo, hi}}, t; "
            f"cvt.rn.f16x2.{FORMAT} $0, lo; }}", "=r,r", [words], dtype=tl.float16, is_pure=True, pack=2)
    byte = ((words >> (8 * r)) & 0xFF).to(tl.uint8)
    if E5M2:
        return byte.to(tl.float8e5, bitcast=True).to(tl.float16)
    return byte.to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def float8_columns_kernel(q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, vs_ptr, m_ptr, l_ptr, acc_ptr,
                          width, splits, qpos_ptr, window, scale,
                          G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                          PAGES_PER_SPLIT: tl.constexpr, WINDOWED: tl.constexpr, SCALED: tl.constexpr,
                          E5M2: tl.constexpr = False, ASM: tl.constexpr = False, ASYNC_SCALES: tl.constexpr = 1,
                          PAGE_IDS: tl.constexpr = False, STEP: tl.constexpr = 0):
    """Float8 pages (`fast_decode.full_pages_kernel`'s, SCALED 1: a scale per token, 2: per page) read the way
    `kivi_columns_kernel` reads packed ones, the G queries as BLOCK_G (>= 8) columns: scores [P, BLOCK_G] = keys
    [P, D] (widened by Triton, as loaded) · queries [D, BLOCK_G]; outputs [D / 2, BLOCK_G] per byte r of the
    values read as 16-bit words (channels 2w + r; loaded transposed, as the dot takes them) · weights. The key
    scales go on the scores' rows, the value scales on the probabilities (over the page's largest, as there).
    Offline for sm_90 (`inspect_kernel.py`, 64-token pages, GQA 4, one warp): a scale per page 184 registers and
    1138 instructions in the page loop, a scale per token 255 and 1242, against 255 and 2 × 1299 (two warps) for
    `full_pages_kernel`; keys read as words too cost 255 registers. On an H200 (batch 8, 32k, GQA 4) 0.142 ms against
    0.216 (scale per page), 0.173 against 0.259 (per token): the default for scaled float8 pages.
    ASYNC_SCALES 1 (default): per-token scales load as [P / 2, 2] blocks, which the pipeline copies ahead (0.175 ->
    0.152 ms; 184 registers, no synchronous load left in the loop); 2: page scales for the whole split load before
    the loop and each step picks its own (0.151 -> 0.150 ms: not the default). PAGE_IDS (`split_page_ids`): as in
    `kivi_columns_kernel`; off by default here: the second buffer of a page's 16 KB of codes leaves 6 programs a
    multiprocessor, 0.152 -> 0.176 ms (3 stages; 0.152 with 4). STEP (< P, a power of two): read STEP tokens a
    step, so a pipeline stage holds part of a page: with PAGE_IDS two 32-token buffers take the shared memory one
    64-token buffer takes (offline, sm_90). Off by default: slower on an H200 (a scale per token 0.146 -> 0.163 ms
    at 32 a step, per page 0.142 -> 0.140; decode_kernel_h200_sweep_fp8_steps.json)."""
    W: tl.constexpr = D // 2
    row = tl.program_id(0)
    split = tl.program_id(1)
    length, query, _, columns_ok, offs_p = _packed_row(len_ptr, row, G, BLOCK_G, P, P, 0, 1)
    words = tl.arange(0, W)
    channels = words * 2
    queries = tl.load(q_ptr + row * G * D + query[None, :] * D + tl.arange(0, D)[:, None], mask=columns_ok[None, :],
                      other=0.0).to(tl.float16)
    scale_log2 = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_even = tl.zeros([W, BLOCK_G], tl.float32)
    acc_odd = tl.zeros([W, BLOCK_G], tl.float32)
    first = split * PAGES_PER_SPLIT
    if first * P < length:
        SPLIT_SCALES: tl.constexpr = SCALED == 2 and ASYNC_SCALES > 1
        ids = split_page_ids(table_ptr, row, width, first, length, P, PAGES_PER_SPLIT, PAGE_IDS or SPLIT_SCALES)
        if SPLIT_SCALES:  # the split's page scales up front: a scalar load in the loop waits
            split_key_scales = tl.load(ks_ptr + ids).to(tl.float32)
            split_value_scales = tl.load(vs_ptr + ids).to(tl.float32)
        TOKENS: tl.constexpr = STEP if STEP else P  # a step's tokens
        for i in range(PAGES_PER_SPLIT * (P // TOKENS)):
            index, page, start, slots, valid = _page_step(table_ptr, row, width, first, i, length, pos_ptr, qpos_ptr,
                                                          window, offs_p, P, P, 0, WINDOWED, TOKENS, ids, PAGE_IDS)
            keys = tl.load(k_ptr + page * P * D + slots[:, None] * D + tl.arange(0, D)[None, :], mask=valid[:, None],
                           other=0.0)
            vc = tl.load(v_ptr + page * P * W + slots[None, :] * W + words[:, None], mask=valid[None, :], other=0)
            s = tl.dot(keys.to(tl.float16), queries)
            if SCALED == 1:
                key_scale = _token_stats(ks_ptr, page * P + start, valid, TOKENS, ASYNC_SCALES > 0)
                value_scale = _token_stats(vs_ptr, page * P + start, valid, TOKENS, ASYNC_SCALES > 0)
            elif ASYNC_SCALES > 1:  # a free page's scale may be anything (and 0 * inf is NaN): 0 where invalid
                key_scale = tl.where(valid, split_item(split_key_scales, index), 0.0)
                value_scale = tl.where(valid, split_item(split_value_scales, index), 0.0)
            else:
                key_scale = tl.where(valid, tl.load(ks_ptr + page).to(tl.float32), 0.0)
                value_scale = tl.where(valid, tl.load(vs_ptr + page).to(tl.float32), 0.0)
            s = tl.where(valid[:, None], s * (key_scale * scale_log2)[:, None], float("-inf"))
            p, alpha, m_i, l_i = softmax_update(s, m_i, l_i, BASE2=True, KEYS_AXIS=0)
            top = tl.max(value_scale, axis=0)
            top = tl.where(top > 0, top, 1.0)
            weights = (p * (value_scale / top)[:, None]).to(tl.float16)
            acc_even = acc_even * alpha[None, :] + top * tl.dot(_float8_field(vc, 0, E5M2, ASM), weights)
            acc_odd = acc_odd * alpha[None, :] + top * tl.dot(_float8_field(vc, 1, E5M2, ASM), weights)
    m_i = m_i * 0.6931471805599453  # back to natural-log units for `combine`
    store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G, BLOCK_G)
    out = acc_ptr + ((row * splits + split) * G + query)[None, :] * D + channels[:, None]
    tl.store(out, acc_even, mask=columns_ok[None, :])
    tl.store(out + 1, acc_odd, mask=columns_ok[None, :])
