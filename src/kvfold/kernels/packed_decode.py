"""Decode kernels for 16-bit queries over packed pages (KIVI's and QServe's KV4: 2/4/8-bit codes with scales).

`decode.paged_decode` sends a packed part here when the query is 16-bit; the kernels compute
`reference.paged_attention`. `kivi_columns_kernel` reads a decode step's query group (up to
`decode.COLUMNS_UP_TO` (query, value group) pairs: GQA 8 with two value groups is 16); `kivi_pages_kernel` reads
taller groups (GQA 16, a few-token turn's queries). `float8_decode.float8_columns_kernel` reads float8 pages the
columns' way.

What makes them fast (measured on an H200 at batch 8 x 32k, `benchmarks/decode_kernel.py`):
- Packed pages are never re-laid out in registers: the words hold channels `w * FIELDS + r` in bit field r, so the
  scores are a sum of FIELDS dot products, one per bit field, each over every FIELDS-th channel of the query (and
  the output is assembled the same way). An interleave (join + reshape) cost a shared-memory layout conversion per
  page.
- Codes become float16 by a bit trick, not a conversion: 0x6400 | c is the float16 1024 + c, exact for c < 1024.
  4- and 8-bit codes are read as 16-bit words (`decode.packed_words`) and unpacked by inline PTX two per
  instruction, as the dot product's operand pairs them in a register; 2-bit bytes are spread to 16-bit lanes first.
  kivi:4 0.339 -> 0.232 ms at 2 warps, 0.191 ms at one warp (`PACKED_LAUNCH`). The columns kernel can read 2-bit
  codes as words too (launch `WORDS`: no byte spreading, and the transposed value codes load by ldmatrix, not byte
  by byte; offline for sm_90, kivi:2 1426 -> 1204 page-loop instructions, kv4:2 1508 -> 1244; not yet timed).
- Values never pass through shared memory as float16: the value scales and zeros ride on the probabilities
  (Σ_t p_t (c_t s_t + z_t) = top Σ_t (p_t s_t / top) c_t + Σ_t p_t z_t), so the codes go from shared memory into
  the dot product as they are, like the keys. Values have a scale per group of channels; the queries are repeated
  once per group in the tile's spare rows or columns, so one dot product serves every group. kivi:2 0.45 -> 0.34 ms.
- The value codes keep their float16 offset, taken off once per row (`FOLD`): kivi:2 0.191 -> 0.187 ms.
- `kivi_columns_kernel` swaps the dot products' operands: the page's tokens (scores) and channels (output) are the
  tile's rows, the (query, value group) pairs its columns, as few as 8 where rows are padded to 16 (GQA 4 with two
  value groups fills 8). Half the tensor-core instructions, half the accumulator registers; and KIVI's per-channel
  key scales go onto the query once per page, (q∘s)·c + q·z, so key codes go into the dot product as they unpack.
  kivi:4 0.173 -> 0.151 ms, kivi:2 0.185 -> 0.136, kv4:4 0.200 -> 0.141, kv4:2 0.235 -> 0.122
  (`benchmarks/results/decode_kernel_h200_sweep_swap.json`).
- A page's scales and zeros load as contiguous blocks (`ASYNC_SCALES`), which Triton's pipeline copies into shared
  memory pages ahead; loaded a bit field or value group at a time (2 bytes a thread) they were synchronous loads,
  and every page waited out their latency: kivi:4 0.151 -> 0.121 ms, kivi:2 0.137 -> 0.111
  (`decode_kernel_h200_sweep_async_scales.json`); the value zeros too, tied to the dot: 0.121 -> 0.111, 0.112 -> 0.104.
- The split's page ids load as one vector before the page loop (`PAGE_IDS`, `split_page_ids`): a page id loaded in
  the loop left every code buffer single (the next page's copies waited for at once; Nsight Compute: 22% of kivi:4's
  stall samples on that wait). kivi:4 0.112 -> 0.104 ms, kivi:2 0.104 -> 0.097, kv4:4 0.135 -> 0.122
  (`decode_kernel_h200_sweep_page_ids.json`).

- `GROUP_ROWS` (the default where G × value groups > 8 and G <= 8: KIVI at GQA 8, head_dim 128, groups of 64
  channels): repeated queries would double the scores, the softmax and the accumulators; with the queries alone
  as columns and each value group's words as its own dot product's rows, sm_90 kivi:4 at GQA 8 goes from 255
  registers with 192 B spilled and 1942 page-loop instructions to 253, no spill and 1519 (the weights' sums by
  the tensor cores, not row reductions). H200, GQA 8: kivi:4 0.160 -> 0.111 ms, kivi:2 0.134 -> 0.110
  (`decode_kernel_h200_sweep_group_rows.json`).

Scores use float16 dot products whatever the query's 16-bit type (the scales are float16): queries beyond
float16's range (|q| > 65504) are not supported.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (padded_page_rows, page_rows, softmax_update, split_page_ids, step_slots, store_stats,
                     window_mask)


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
def _field_offset(r: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """The float16 offset that `_field(..., BIASED=True)` leaves in bit field r's codes (see there)."""
    if ASM:
        offset = 1024 >> (r * BITS % 8)
    else:
        offset = 1024
    return offset


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
        update = top[:, None] * tl.dot(weights, _field(codes, r, BITS, ASM, True)) \
            + (zeros - top * weight_sum * _field_offset(r, BITS, ASM))[:, None]
    else:
        update = top[:, None] * tl.dot(weights, _field(codes, r, BITS, ASM)) + zeros[:, None]
    if VALUE_CHANNEL:
        update = update * tl.load(vch_ptr + page * D + channels + r).to(tl.float32)[None, :]
    return update


@triton.jit
def _packed_row(len_ptr, row, G: tl.constexpr, BLOCK_G: tl.constexpr, P: tl.constexpr, P_PAD: tl.constexpr,
                PAGE_TOKENS: tl.constexpr, NVG: tl.constexpr):
    """The row's length in this part's slots (mixed pages: whole pages of PAGE_TOKENS), its tile's BLOCK_G
    (query, value group) pairs (pair n: query n % G, value group n // G; real where n < G * NVG) and a page's slot
    offsets."""
    length = tl.load(len_ptr + row)
    pairs = tl.arange(0, BLOCK_G)
    if PAGE_TOKENS:
        length = length // PAGE_TOKENS * P
        offs_p = tl.arange(0, P_PAD)
    else:
        offs_p = tl.arange(0, P)
    return length, pairs % G, pairs // G, pairs < G * NVG, offs_p


@triton.jit
def _packed_page(table_ptr, row, width, index, length, pos_ptr, qpos_ptr, window, P: tl.constexpr,
                 P_PAD: tl.constexpr, PAGE_TOKENS: tl.constexpr, WINDOWED: tl.constexpr, ids=0, i=0,
                 PAGE_IDS: tl.constexpr = False):
    """The row's page at `index` and its valid slots (mixed pages: padded to P_PAD; no sliding window there).
    PAGE_IDS: picked from `ids`, the split's page ids already loaded (`split_page_ids`); index is the split's first
    page + i."""
    if PAGE_TOKENS:
        page, valid = padded_page_rows(table_ptr, row, width, index, length, P, P_PAD, ids, i, PAGE_IDS)
    else:
        page, valid = page_rows(table_ptr, row, width, index, length, P, ids, i, PAGE_IDS)
        valid = window_mask(valid, pos_ptr, page, qpos_ptr, window, P, WINDOWED)
    return page, valid


@triton.jit
def _page_step(table_ptr, row, width, first, i, length, pos_ptr, qpos_ptr, window, offs_p, P: tl.constexpr,
               P_PAD: tl.constexpr, PAGE_TOKENS: tl.constexpr, WINDOWED: tl.constexpr, TOKENS: tl.constexpr, ids,
               PAGE_IDS: tl.constexpr):
    """Step i of a split of the columns kernels, TOKENS tokens a step: a whole page (`_packed_page`, slots
    `offs_p`) or part of one (`common.step_slots`). Returns the split's page index, the page id, the step's first
    slot in the page, its slots and which are valid."""
    if TOKENS == P:
        index = i
        start = 0
        page, valid = _packed_page(table_ptr, row, width, first + i, length, pos_ptr, qpos_ptr, window, P, P_PAD,
                                   PAGE_TOKENS, WINDOWED, ids, i, PAGE_IDS)
        slots = offs_p
    else:
        index, page, start, slots, valid = step_slots(table_ptr, row, width, first, i, length, pos_ptr, qpos_ptr,
                                                      window, P, TOKENS, WINDOWED, ids, PAGE_IDS)
    return index, page, start, slots, valid


@triton.jit
def kivi_pages_kernel(q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, kz_ptr, ksm_ptr, vs_ptr, vz_ptr,
                      vch_ptr, m_ptr, l_ptr, acc_ptr, width, splits, qpos_ptr, window, scale,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      BITS: tl.constexpr, VG: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr, WINDOWED: tl.constexpr,
                      KEY_TOKEN: tl.constexpr, PAGE_TOKENS: tl.constexpr = 0, P_PAD: tl.constexpr = 0,
                      VALUE_CHANNEL: tl.constexpr = False, ASM: tl.constexpr = False, FOLD: tl.constexpr = True,
                      PAGE_IDS: tl.constexpr = False):
    """Packed pages: codes [P, D * BITS / 8] bytes, read as 16-bit words where a word's fields give each dot >= 16
    channels (`packed_words`), else bytes; values with a scale and zero per token per VG channels. Keys with a
    scale and zero per channel per page (KIVI), or (KEY_TOKEN, QServe's KV4) per token, times the page's channel
    factors λ: then q·k = scale_t Σ (qλ)·c + zero_t Σ qλ, so the codes still go straight into the dots.
    A word of 16 / BITS (or 8 / BITS) bit fields holds channels w * FIELDS + r in field r: one dot product per field.
    PAGE_TOKENS (ZipCache's mixed pages): each page of the store holds PAGE_TOKENS tokens, of which this part reads
    P slots (any P, padded to the power of two P_PAD): row lengths count the store's tokens (whole pages), and the value
    scales hold PAGE_TOKENS slots a page; VALUE_CHANNEL: the values also have a factor per page and channel.
    PAGE_IDS: the split's page ids loaded before the loop (`split_page_ids`; double-buffers the pages offline for
    sm_90 as in `kivi_columns_kernel`; not yet timed here, so off by default).
    ASM: unpack with inline PTX (GPU only; Triton's interpreter runs the plain operations). FOLD: value codes keep
    their float16 offset, taken off once per row of each dot product (`_value_update`; on an H200 at batch 8 x
    32k: kivi:4 0.176 -> 0.174 ms, kivi:2 0.191 -> 0.187, kv4:4 0.205 -> 0.201). The query rows fill the tile's rows
    (`kivi_columns_kernel`: its columns)."""
    FIELDS: tl.constexpr = k_ptr.dtype.element_ty.primitive_bitwidth // BITS
    W: tl.constexpr = D // FIELDS  # words per token
    NVG: tl.constexpr = D // VG
    STAT: tl.constexpr = PAGE_TOKENS if PAGE_TOKENS else P  # slots per page in the value scales
    row = tl.program_id(0)
    split = tl.program_id(1)
    length, query, group, rows_ok, offs_p = _packed_row(len_ptr, row, G, BLOCK_G, P, P_PAD, PAGE_TOKENS, NVG)
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
        ids = split_page_ids(table_ptr, row, width, first, length, P, PAGES_PER_SPLIT, PAGE_IDS)
        for i in range(PAGES_PER_SPLIT):
            page, valid = _packed_page(table_ptr, row, width, first + i, length, pos_ptr, qpos_ptr, window, P, P_PAD,
                                       PAGE_TOKENS, WINDOWED, ids, i, PAGE_IDS)
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


@triton.jit
def _query_columns(q_ptr, row, query, columns_ok, channels, FIELDS: tl.constexpr, G: tl.constexpr,
                   D: tl.constexpr):
    """The query's channels of each bit field, as columns: float16 [W, BLOCK_N] each (column n: query n % G)."""
    fields = ()
    for r in tl.static_range(FIELDS):
        q = tl.load(q_ptr + row * G * D + query[None, :] * D + channels[:, None] + r, mask=columns_ok[None, :],
                    other=0.0)
        fields = fields + (q.to(tl.float16),)
    return fields


@triton.jit
def _column_scores(kc, qs, page, offs_p, valid, channels, ks_ptr, kz_ptr, ksm_ptr, P: tl.constexpr, D: tl.constexpr,
                   FIELDS: tl.constexpr, BITS: tl.constexpr, KEY_TOKEN: tl.constexpr, ASM: tl.constexpr,
                   FOLD: tl.constexpr = False, ASYNC: tl.constexpr = False, start=0):
    """A page's scores [P, BLOCK_N], the key codes as the dot products' left operand. The page's per-channel
    factor goes onto the query columns, so the codes go into the dots as they unpack: KIVI's scale,
    q·(c s + z) = (q∘s)·c + q·z; KV4's λ, q·((c s_t + z_t) λ) = s_t (qλ)·c + z_t Σ qλ. The per-column sums
    (q·z or Σ qλ) add up over the fields first: one reduction a page. FOLD (KIVI): the codes keep their float16
    offset b, (q∘s)·(b + c) - b Σ q∘s, and b Σ q∘s joins q·z in that one reduction (one subtraction per two codes
    less, one multiply-add per query channel more). `offs_p` are the codes' slots in the page, from `start`."""
    s = tl.zeros([kc.shape[0], qs[0].shape[1]], tl.float32)
    sums = tl.zeros(qs[0].shape, tl.float32)
    key_channel = page * D + channels
    if ASYNC:  # a page's factors as one [W, FIELDS] block: contiguous, so the loop's pipeline copies them ahead
        # (loaded a field at a time, 2 bytes a thread, they were synchronous loads inside the page step)
        block = key_channel[:, None] + tl.arange(0, FIELDS)[None, :]
        factors = tl.load((ksm_ptr if KEY_TOKEN else ks_ptr) + block)
        if not KEY_TOKEN:
            zeros = tl.load(kz_ptr + block)
    for r in tl.static_range(FIELDS):
        if ASYNC:  # column r (each thread holds whole rows of the block: no data moves)
            this = tl.arange(0, FIELDS)[None, :] == r
            factor = tl.sum(tl.where(this, factors, 0.0), axis=1).to(tl.float32)
            if not KEY_TOKEN:
                zero = tl.sum(tl.where(this, zeros, 0.0), axis=1).to(tl.float32)
        else:
            factor = tl.load((ksm_ptr if KEY_TOKEN else ks_ptr) + key_channel + r).to(tl.float32)
            if not KEY_TOKEN:
                zero = tl.load(kz_ptr + key_channel + r).to(tl.float32)
        query = qs[r].to(tl.float32)
        scaled = (query * factor[:, None]).to(tl.float16)
        if KEY_TOKEN:
            s = tl.dot(_field(kc, r, BITS, ASM), scaled, s)
            sums += scaled.to(tl.float32)
        elif FOLD:
            s = tl.dot(_field(kc, r, BITS, ASM, True), scaled, s)
            sums += query * zero[:, None] - _field_offset(r, BITS, ASM) * scaled.to(tl.float32)
        else:
            s = tl.dot(_field(kc, r, BITS, ASM), scaled, s)
            sums += query * zero[:, None]
    if KEY_TOKEN and ASYNC:
        s = s * _token_stats(ks_ptr, page * P + start, valid, kc.shape[0], True)[:, None] \
            + _token_stats(kz_ptr, page * P + start, valid, kc.shape[0], True)[:, None] * tl.sum(sums, axis=0)[None, :]
    elif KEY_TOKEN:  # unmasked (free slots' scores become -inf after this): the pipeline copies it ahead as it is
        token = page * P + offs_p
        s = s * tl.load(ks_ptr + token).to(tl.float32)[:, None] \
            + tl.load(kz_ptr + token).to(tl.float32)[:, None] * tl.sum(sums, axis=0)[None, :]
    else:
        s = s + tl.sum(sums, axis=0)[None, :]
    return s


@triton.jit
def _token_stats(ptr, first, valid, P: tl.constexpr, ASYNC: tl.constexpr):
    """P consecutive 16-bit statistics of a page's slots from ptr + first as float32 [P], 0 where not `valid`.
    ASYNC: loaded whole (the page is real, its free slots may hold anything) as a [P / 2, 2] block, 4 bytes a
    thread, which the loop's pipeline copies ahead; a masked [P] load is 2 bytes a thread, synchronous."""
    if ASYNC:
        pairs = first + tl.arange(0, P // 2)[:, None] * 2 + tl.arange(0, 2)[None, :]
        stats = tl.reshape(tl.load(ptr + pairs), [P]).to(tl.float32)
        return tl.where(valid, stats, 0.0)
    return tl.load(ptr + first + tl.arange(0, P), mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _column_value_weights(p, vs_ptr, vz_ptr, token_stat, valid, group, NVG: tl.constexpr, G: tl.constexpr,
                          ASYNC: tl.constexpr, TIE: tl.constexpr = False):
    """`_value_weights` for columns: p [P, BLOCK_N], column n serving value group `group[n]`. Returns the weights
    (float16), the column's largest scale, the zeros' share and the weights' sum (for FOLD) [BLOCK_N].
    TIE: the zeros enter the weights as + 0 × zero (exact: masked slots load 0, stored zeros are finite), so their
    load feeds a dot product: Triton's pipeline copies ahead only the loads that do (offline, sm_90: the page
    loop's last 2 synchronous loads go; H200: kivi:4 0.121 -> 0.111 ms)."""
    if ASYNC and p.shape[1] == G * NVG:  # [P, NVG] blocks, contiguous (copied ahead), spread to the G columns each
        block = token_stat[:, None] + tl.arange(0, NVG)[None, :]
        scales = tl.load(vs_ptr + block, mask=valid[:, None], other=0.0)
        zeros = tl.load(vz_ptr + block, mask=valid[:, None], other=0.0)
        v_scale = tl.reshape(tl.broadcast_to(scales[:, :, None], [p.shape[0], NVG, G]), p.shape).to(tl.float32)
        v_zero = tl.reshape(tl.broadcast_to(zeros[:, :, None], [p.shape[0], NVG, G]), p.shape).to(tl.float32)
    else:
        v_scale = tl.zeros_like(p)
        v_zero = tl.zeros_like(p)
        for g in tl.static_range(NVG):
            scale_g = tl.load(vs_ptr + token_stat + g, mask=valid, other=0.0).to(tl.float32)
            zero_g = tl.load(vz_ptr + token_stat + g, mask=valid, other=0.0).to(tl.float32)
            v_scale = tl.where(group[None, :] == g, scale_g[:, None], v_scale)
            v_zero = tl.where(group[None, :] == g, zero_g[:, None], v_zero)
    top = tl.max(v_scale, axis=0)
    top = tl.where(top > 0, top, 1.0)
    if TIE:
        v_scale = v_scale + v_zero * 0.0
    weights = (p * v_scale * (1.0 / top)[None, :]).to(tl.float16)
    return weights, top, tl.sum(p * v_zero, axis=0), tl.sum(weights.to(tl.float32), axis=0)


@triton.jit
def _group_value_weights(p, scales, zeros, tops, g: tl.constexpr, NVG: tl.constexpr):
    """GROUP_ROWS: value group g's weights for queries as columns, from p [P, BLOCK_G], a page's scales and zeros
    [P, NVG] (0 where not valid) and their largest scales [NVG]: the weights p s_t / top (float16), top, and per
    column the zeros' share Σ_t p_t z_t."""
    this = tl.arange(0, NVG)[None, :] == g  # column g (each thread holds whole rows of the block: no data moves)
    scale = tl.sum(tl.where(this, scales, 0.0), axis=1)
    zero = tl.sum(tl.where(this, zeros, 0.0), axis=1)
    top = tl.sum(tl.where(tl.arange(0, NVG) == g, tops, 0.0), axis=0)
    weights = (p * scale[:, None] * (1.0 / top)).to(tl.float16)
    return weights, top, tl.sum(p * zero[:, None], axis=0)


@triton.jit
def _group_value_codes(v_ptr, page, slots, valid, g: tl.constexpr, P: tl.constexpr, W: tl.constexpr,
                       WG: tl.constexpr, FIELDS: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """GROUP_ROWS: the page's value codes of group g, transposed as the dot takes them: words g WG .. (g + 1) WG
    (a word's FIELDS channels share a value group: VG is a multiple of FIELDS) [WG, P]."""
    words = g * WG + tl.arange(0, WG)
    vc = tl.load(v_ptr + page * P * W + slots[None, :] * W + words[:, None], mask=valid[None, :], other=0)
    if ASM and FIELDS * BITS == 8:
        vc = _spread_bytes(vc)
    return vc


@triton.jit
def _group_rows_update(accs, alpha, p, v_ptr, vs_ptr, vz_ptr, vch_ptr, page, slots, valid, token_stat,
                       P: tl.constexpr, D: tl.constexpr, W: tl.constexpr, WG: tl.constexpr, NVG: tl.constexpr,
                       FIELDS: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr, FOLD: tl.constexpr,
                       VALUE_CHANNEL: tl.constexpr, TIE: tl.constexpr):
    """GROUP_ROWS: a page's values into the accumulators (one per value group and field, [WG, BLOCK_G]). The page's
    scales and zeros load as one [P, NVG] block each (contiguous: copied ahead); TIE as `_column_value_weights`."""
    block = token_stat[:, None] + tl.arange(0, NVG)[None, :]
    scales = tl.load(vs_ptr + block, mask=valid[:, None], other=0.0).to(tl.float32)
    zeros = tl.load(vz_ptr + block, mask=valid[:, None], other=0.0).to(tl.float32)
    if TIE:
        scales = scales + zeros * 0.0
    tops = tl.max(scales, axis=0)
    tops = tl.where(tops > 0, tops, 1.0)
    updated = ()
    for g in tl.static_range(NVG):
        weights, top, zero_share = _group_value_weights(p, scales, zeros, tops, g, NVG)
        vc = _group_value_codes(v_ptr, page, slots, valid, g, P, W, WG, FIELDS, BITS, ASM)
        if FOLD:  # Σ_t w_t in every row, by the tensor cores (a sum over the tile's rows costs shuffles)
            weight_sums = tl.dot(tl.full([WG, p.shape[0]], 1.0, tl.float16), weights)
        for r in tl.static_range(FIELDS):
            if FOLD:  # the codes keep their float16 offset b: Σ w (b + c) - b Σ w, the dot starting from -b Σ w
                update = top * tl.dot(_field(vc, r, BITS, ASM, True), weights,
                                      weight_sums * -_field_offset(r, BITS, ASM)) + zero_share[None, :]
            else:
                update = top * tl.dot(_field(vc, r, BITS, ASM), weights) + zero_share[None, :]
            if VALUE_CHANNEL:
                channels = (g * WG + tl.arange(0, WG)) * FIELDS + r
                update = update * tl.load(vch_ptr + page * D + channels).to(tl.float32)[:, None]
            updated = updated + (accs[g * FIELDS + r] * alpha[None, :] + update,)
    return updated


@triton.jit
def kivi_columns_kernel(q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, kz_ptr, ksm_ptr, vs_ptr, vz_ptr,
                        vch_ptr, m_ptr, l_ptr, acc_ptr, width, splits, qpos_ptr, window, scale,
                        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                        BITS: tl.constexpr, VG: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr,
                        WINDOWED: tl.constexpr, KEY_TOKEN: tl.constexpr, PAGE_TOKENS: tl.constexpr = 0,
                        P_PAD: tl.constexpr = 0, VALUE_CHANNEL: tl.constexpr = False, ASM: tl.constexpr = False,
                        FOLD: tl.constexpr = True, KEY_FOLD: tl.constexpr = True,
                        ASYNC_SCALES: tl.constexpr = 3, PAGE_IDS: tl.constexpr = False, STEP: tl.constexpr = 0,
                        GROUP_ROWS: tl.constexpr = False):
    """`kivi_pages_kernel` with the dot products' operands swapped: scores [P, BLOCK_G] = codes [P, W] · query
    columns [W, BLOCK_G] per bit field, outputs [W, BLOCK_G] = value codes [W, P] (loaded transposed, as the dot
    takes them) · weights [P, BLOCK_G]. BLOCK_G columns (>= 8): G queries × D / VG value groups. Same arguments,
    and KEY_FOLD: KIVI's key codes keep their float16 offset too (`_column_scores`); ASYNC_SCALES 1: a page's key
    scales and zeros load as [W, FIELDS] blocks, 2: the values' as [P, NVG] blocks too, 3 (default): and the value
    zeros are tied to the dot product (`_column_value_weights`' TIE; kivi:4 0.121 -> 0.111 ms, kv4:4 unchanged);
    PAGE_IDS: the split's page ids loaded before the loop (`split_page_ids`; `decode._partials` sets it on a GPU
    when PAGES_PER_SPLIT is a power of two). Loaded a field or group at
    a time they were 2 bytes a thread, which Triton's pipeline does not copy ahead: synchronous loads (16 LDG in
    the page loop, SASS) whose latency every page waited out. On an H200 (batch 8 × 32k, GQA 4;
    decode_kernel_h200_sweep_async_scales.json) level 2 took kivi:4 0.151 -> 0.121 ms, kivi:2 0.137 -> 0.111,
    kv4:4 0.142 -> 0.135, but kv4:2 0.122 -> 0.130 (`decode._partials` keeps it at 0 there); KEY_FOLD alone
    changed nothing measurable (kivi:4 0.123 -> 0.121). STEP (< P, a power of two >= 16; not mixed pages): read
    STEP tokens a step, part of a page (`common.step_slots`; fewer codes in registers at a time). Off by default:
    slower on an H200 (kivi:4 0.101 -> 0.123 ms at 32 a step, kv4:4 0.122 -> 0.178;
    decode_kernel_h200_sweep_packed_steps.json). GROUP_ROWS: the columns are the G queries alone (BLOCK_G >= G, not
    G × value groups) and the value groups split the output's rows instead: per group, its words' codes · its
    weights (`_group_value_weights`). Repeating the queries once per value group doubles (KIVI at head_dim 128,
    group 64) the scores, the softmax and the accumulators wherever G × groups > 8, the dot's narrowest tile:
    at GQA 8, kivi:4 spilled (255 registers, 1942 sm_90 loop instructions)."""
    FIELDS: tl.constexpr = k_ptr.dtype.element_ty.primitive_bitwidth // BITS
    W: tl.constexpr = D // FIELDS  # words per token
    NVG: tl.constexpr = D // VG
    WG: tl.constexpr = W // NVG  # words per value group (GROUP_ROWS)
    STAT: tl.constexpr = PAGE_TOKENS if PAGE_TOKENS else P  # slots per page in the value scales
    row = tl.program_id(0)
    split = tl.program_id(1)
    length, query, group, columns_ok, offs_p = _packed_row(len_ptr, row, G, BLOCK_G, P, P_PAD, PAGE_TOKENS,
                                                           1 if GROUP_ROWS else NVG)
    words = tl.arange(0, W)
    channels = words * FIELDS  # each word's first channel
    qs = _query_columns(q_ptr, row, query, columns_ok, channels, FIELDS, G, D)
    scale_log2 = scale * 1.4426950408889634  # base-2 softmax: one multiply less per score
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    accs = ()  # GROUP_ROWS: one per (value group, field), [WG, BLOCK_G]
    for r in tl.static_range(NVG * FIELDS if GROUP_ROWS else FIELDS):
        accs = accs + (tl.zeros([WG if GROUP_ROWS else W, BLOCK_G], tl.float32),)
    first = split * PAGES_PER_SPLIT
    if first * P < length:
        ids = split_page_ids(table_ptr, row, width, first, length, P, PAGES_PER_SPLIT, PAGE_IDS)
        TOKENS: tl.constexpr = STEP if STEP else P  # a step's tokens
        for i in range(PAGES_PER_SPLIT * (P // TOKENS)):
            _, page, start, slots, valid = _page_step(table_ptr, row, width, first, i, length, pos_ptr, qpos_ptr,
                                                      window, offs_p, P, P_PAD, PAGE_TOKENS, WINDOWED, TOKENS, ids,
                                                      PAGE_IDS)
            kc = tl.load(k_ptr + page * P * W + slots[:, None] * W + words[None, :], mask=valid[:, None], other=0)
            if ASM and FIELDS * BITS == 8:
                kc = _spread_bytes(kc)
            if not GROUP_ROWS:
                vc = tl.load(v_ptr + page * P * W + slots[None, :] * W + words[:, None], mask=valid[None, :], other=0)
                if ASM and FIELDS * BITS == 8:
                    vc = _spread_bytes(vc)
            s = _column_scores(kc, qs, page, slots, valid, channels, ks_ptr, kz_ptr, ksm_ptr, P, D, FIELDS, BITS,
                               KEY_TOKEN, ASM, KEY_FOLD, ASYNC_SCALES > 0, start)
            s = tl.where(valid[:, None], s * scale_log2, float("-inf"))
            p, alpha, m_i, l_i = softmax_update(s, m_i, l_i, BASE2=True, KEYS_AXIS=0)
            token_stat = page * STAT * NVG + slots * NVG
            if GROUP_ROWS:
                accs = _group_rows_update(accs, alpha, p, v_ptr, vs_ptr, vz_ptr, vch_ptr, page, slots, valid,
                                          token_stat, P, D, W, WG, NVG, FIELDS, BITS, ASM, FOLD, VALUE_CHANNEL,
                                          ASYNC_SCALES > 2)
            else:
                weights, top, zeros, weight_sum = _column_value_weights(p, vs_ptr, vz_ptr, token_stat, valid, group,
                                                                        NVG, G, ASYNC_SCALES > 1, ASYNC_SCALES > 2)
                updated = ()
                for r in tl.static_range(FIELDS):
                    if FOLD:  # the codes keep their float16 offset b: Σ w (b + c) - b Σ w
                        update = top[None, :] * tl.dot(_field(vc, r, BITS, ASM, True), weights) \
                            + (zeros - top * weight_sum * _field_offset(r, BITS, ASM))[None, :]
                    else:
                        update = top[None, :] * tl.dot(_field(vc, r, BITS, ASM), weights) + zeros[None, :]
                    if VALUE_CHANNEL:
                        update = update * tl.load(vch_ptr + page * D + channels + r).to(tl.float32)[:, None]
                    updated = updated + (accs[r] * alpha[None, :] + update,)
                accs = updated
    m_i = m_i * 0.6931471805599453  # back to natural-log units for `combine` (-inf stays -inf)
    store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G, BLOCK_G)  # columns < G: the first group's
    out = acc_ptr + ((row * splits + split) * G + query)[None, :] * D
    if GROUP_ROWS:  # group g's rows hold words g WG ..
        for g in tl.static_range(NVG):
            group_channels = (g * WG + tl.arange(0, WG)) * FIELDS
            for r in tl.static_range(FIELDS):
                tl.store(out + group_channels[:, None] + r, accs[g * FIELDS + r], mask=columns_ok[None, :])
    else:
        for r in tl.static_range(FIELDS):  # each channel from its group's columns
            mine = columns_ok[None, :] & (group[None, :] == ((channels + r) // VG)[:, None])
            tl.store(out + channels[:, None] + r, accs[r], mask=mine)
