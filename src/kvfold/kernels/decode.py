"""Triton decode attention over kvfold's paged store (flash-decoding over per-row page tables).

One program handles one row (a batch element's KV head, with all its GQA query heads) over a split of its pages:
it loads each page, de-quantizes packed KIVI pages (or scaled float8 pages) in registers (codes never expand in
HBM), and keeps an online softmax. Splits and the store's parts (packed pages, full-precision tail) are merged by
`combine`. The meaning is `reference.paged_attention`; tests compare the two under TRITON_INTERPRET=1 on the CPU
and at full size on a GPU. 16-bit queries over 16-bit or float8 pages go to the faster kernels of `fast_decode`,
over KIVI or KV4 pages to `packed_decode`; this general kernel reads the rest (float32 queries; packed rows
narrower than 16 bytes on a GPU).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (combine_kernel, empty_state, page_rows, query_tile, softmax_step, store_stats, window_mask,
                     write_token_kernel)
from .fast_decode import full_pages_kernel
from .float8_decode import float8_columns_kernel
from .packed_decode import kivi_columns_kernel, kivi_pages_kernel


@dataclass(frozen=True)
class PagedPart:
    """One part of a layer's store as the kernel reads it. `bits` 0 means float pages (16/32-bit, or float8 with
    `scaled` 1: a scale per token, 2: a scale per page). Packed keys have a scale and zero per channel (KIVI), or per
    token with `key_smooth` λ per channel (QServe's KV4: k = (code * scale + zero) * λ). `rotation` R: the pages
    hold x @ R."""

    table: torch.Tensor  # [rows, width] int32 page ids
    lengths: torch.Tensor  # [rows] int32 tokens per row
    keys: torch.Tensor  # [pages, page, dim] (or packed codes [pages, page, dim * bits / 8] uint8)
    values: torch.Tensor
    positions: torch.Tensor  # [pages, page] int32
    bits: int = 0
    key_scale: torch.Tensor | None = None  # [pages, dim] float16 ([pages, page] with `key_smooth`)
    key_zero: torch.Tensor | None = None
    key_smooth: torch.Tensor | None = None  # [pages, dim] float16: keys per token, times a per-page channel factor
    value_scale: torch.Tensor | None = None  # [pages, page, dim / value_group] float16
    value_zero: torch.Tensor | None = None
    value_group: int = 1
    scaled: int = 0
    rotation: torch.Tensor | None = None  # [dim, dim] float32, orthogonal: keys are stored as k @ rotation
    value_rotation: torch.Tensor | None = None  # values' own R (None: the keys')
    # ZipCache's mixed pages: the store's pages hold `page_tokens` tokens and this part P of their slots (any P);
    # `lengths` count the store's tokens (whole pages); value scales hold `page_tokens` slots a page
    page_tokens: int = 0
    value_channel: torch.Tensor | None = None  # [pages, dim] float16: the values' factor per page and channel
    pages_used: int = 0  # pages the rows hold, all rows together (host-known; 0: unknown): sizes the splits


@triton.jit
def _unpack(codes, BITS: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    """Packed bytes [P, D * BITS / 8] -> codes [P, D], low bits first (the order `reference.pack` writes)."""
    if BITS == 8:
        unpacked = codes
    elif BITS == 4:
        unpacked = tl.reshape(tl.join(codes & 15, codes >> 4), [P, D])
    else:  # join appends a last axis: join(join(c0, c2), join(c1, c3)) lays out c0, c1, c2, c3
        even = tl.join(codes & 3, (codes >> 4) & 3)
        odd = tl.join((codes >> 2) & 3, codes >> 6)
        unpacked = tl.reshape(tl.join(even, odd), [P, D])
    return unpacked


@triton.jit
def _per_channel(per_group, P: tl.constexpr, NVG: tl.constexpr, VG: tl.constexpr):
    """[P, NVG] group statistics -> [P, NVG * VG], each repeated over its group's channels."""
    return tl.reshape(tl.broadcast_to(per_group[:, :, None], [P, NVG, VG]), [P, NVG * VG])


@triton.jit
def _paged_decode_kernel(
    q_ptr, table_ptr, len_ptr, k_ptr, v_ptr, pos_ptr, ks_ptr, kz_ptr, ksm_ptr, vs_ptr, vz_ptr,
    m_ptr, l_ptr, acc_ptr,
    width, splits, qpos_ptr, window, scale,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    BITS: tl.constexpr, VG: tl.constexpr, PRECISE: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr,
    SCALED: tl.constexpr, KEY_TOKEN: tl.constexpr, WINDOWED: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(len_ptr + row)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, P)
    q = query_tile(q_ptr, row, G, BLOCK_G, D)
    m_i, l_i, acc = empty_state(BLOCK_G, D)
    if not PRECISE:
        q = q.to(tl.bfloat16)
    # No branch inside the loop (pages past the row's end are masked, not skipped), so the compiler can pipeline
    # the page-table and page loads across iterations; splits past the row's end skip the loop as a whole.
    if split * PAGES_PER_SPLIT * P < length:
        for i in range(PAGES_PER_SPLIT):
            page, valid = page_rows(table_ptr, row, width, split * PAGES_PER_SPLIT + i, length, P)
            valid = window_mask(valid, pos_ptr, page, qpos_ptr, window, P, WINDOWED)
            if BITS == 0:
                k = tl.load(k_ptr + page * P * D + offs_p[:, None] * D + offs_d[None, :]).to(tl.float32)
                v = tl.load(v_ptr + page * P * D + offs_p[:, None] * D + offs_d[None, :]).to(tl.float32)
                if SCALED == 1:  # float8 with a scale per token
                    k = k * tl.load(ks_ptr + page * P + offs_p).to(tl.float32)[:, None]
                    v = v * tl.load(vs_ptr + page * P + offs_p).to(tl.float32)[:, None]
                elif SCALED == 2:  # float8 with a scale per page
                    k = k * tl.load(ks_ptr + page).to(tl.float32)
                    v = v * tl.load(vs_ptr + page).to(tl.float32)
            else:
                BYTES: tl.constexpr = D * BITS // 8
                NVG: tl.constexpr = D // VG
                code_off = page * P * BYTES + offs_p[:, None] * BYTES + tl.arange(0, BYTES)[None, :]
                kc = _unpack(tl.load(k_ptr + code_off), BITS, P, D)
                vc = _unpack(tl.load(v_ptr + code_off), BITS, P, D)
                if KEY_TOKEN:  # a scale and zero per token, then the page's per-channel smoothing factor
                    ks = tl.load(ks_ptr + page * P + offs_p).to(tl.float32)
                    kz = tl.load(kz_ptr + page * P + offs_p).to(tl.float32)
                    smooth = tl.load(ksm_ptr + page * D + offs_d).to(tl.float32)
                    k = (kc.to(tl.float32) * ks[:, None] + kz[:, None]) * smooth[None, :]
                else:
                    ks = tl.load(ks_ptr + page * D + offs_d).to(tl.float32)
                    kz = tl.load(kz_ptr + page * D + offs_d).to(tl.float32)
                    k = kc.to(tl.float32) * ks[None, :] + kz[None, :]
                group_off = page * P * NVG + offs_p[:, None] * NVG + tl.arange(0, NVG)[None, :]
                vs = _per_channel(tl.load(vs_ptr + group_off).to(tl.float32), P, NVG, VG)
                vz = _per_channel(tl.load(vz_ptr + group_off).to(tl.float32), P, NVG, VG)
                v = vc.to(tl.float32) * vs + vz
            v = tl.where(valid[:, None], v, 0.0)
            if PRECISE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k.to(tl.bfloat16)))
            p, alpha, m_i, l_i = softmax_step(s, valid[None, :], m_i, l_i, scale)
            if PRECISE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
    out = store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G, BLOCK_G)
    tl.store(acc_ptr + out[:, None] * D + offs_d[None, :], acc, mask=offs_g[:, None] < G)


def _partials(query: torch.Tensor, part: PagedPart, q_pos: torch.Tensor, window: int, scale: float,
              pages_per_split: int | None, precise: bool, launch: dict,
              tile_tokens: int, batch_invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, group, dim = query.shape
    page = part.positions.shape[1]
    width = max(1, part.table.shape[1])
    if batch_invariant and pages_per_split is None:  # splits of a fixed token count, whatever else is in the batch
        pages_per_split = triton.next_power_of_2(max(1, INVARIANT_SPLIT_TOKENS // page))
    if pages_per_split is None and query.device.type != "cuda":  # Triton's interpreter runs a grid's programs one
        pages_per_split = width  # after another at a fixed cost each: one split per row, exactly as long as the rows
    fast = None if precise and not part.page_tokens else fast_kind(part, dim, query.device)
    columns, packed_rows, group_rows = False, 0, False
    if fast == "packed":
        value_groups = dim // part.value_group
        pairs = triton.next_power_of_2(group * value_groups)  # (query, value group) pairs of a row
        asked_words = bool(launch.get("WORDS", False))  # GROUP_ROWS never sets WORDS itself (below)
        group_words = part.value_group * part.bits // (8 * packed_words(part.keys, dim, part.bits,
                                                                        asked_words).element_size())
        # GROUP_ROWS where repeating the queries per value group passes the dot's 8 columns and (on a GPU) a group
        # holds 16 words: H200, GQA 8, batch 8 x 32k, kivi:4 0.160 -> 0.111 ms, kivi:2 0.134 -> 0.110
        # (decode_kernel_h200_sweep_group_rows.json)
        fits = query.device.type != "cuda" or group_words >= 16
        default = group * value_groups > 8 and group <= 8 and fits  # timed at GQA 8 (GQA 16: untimed, rows kernel)
        group_rows = bool(launch.get("GROUP_ROWS", default)) and value_groups > 1
        columns = launch.get("COLUMNS", (triton.next_power_of_2(group) if group_rows else pairs) <= COLUMNS_UP_TO)
        group_rows = group_rows and bool(columns)
        packed_rows = max(8, triton.next_power_of_2(group)) if group_rows else max(8 if columns else 16, pairs)
    elif fast == "full" and part.scaled and query.dtype != torch.float32:  # its dots are float16: a float32 query
        # keeps full_pages_kernel's float32 ones; columns as timed (GQA <= 8, pages of >= TILE_TOKENS)
        columns = bool(launch.get("COLUMNS", group <= FLOAT8_COLUMNS_UP_TO and page >= TILE_TOKENS)) and dim >= 32
    if columns and fast == "full":  # one warp: 0.142 against 0.153 ms with two (scale per page)
        options = {**PACKED_LAUNCH, **launch}
    else:
        options = launch or _default_launch(fast, part.scaled, packed_rows)
    if columns and fast == "packed" and part.bits == 2:
        if part.key_smooth is not None:  # kv4:2: 0.122 ms loaded field by field, 0.130 copied ahead
            options = {"ASYNC_SCALES": 0, **options}
        if query.device.type == "cuda" and not group_rows:  # codes as 16-bit words (H200, batch 8 x 32k: kivi:2
            options = {"WORDS": 1, **options}  # 0.097 -> 0.086 ms, kv4:2 0.112 -> 0.107); GROUP_ROWS: bytes, 16 a group
    if columns and query.device.type != "cuda":  # the interpreter copies nothing ahead, and its extra steps cost
        options = {"ASYNC_SCALES": 0, "KEY_FOLD": 0, **options}  # CPU time (tests set both explicitly)
    # COLUMNS picks the kernel, WORDS how the packed columns one reads 2-bit codes (`packed_words`); FOLD is a
    # constant of the packed kernels, KEY_FOLD and GROUP_ROWS of the packed columns one, ASYNC_SCALES of both columns kernels,
    # PAGE_IDS of every fast kernel, STEP of the columns ones
    two_bit_words = bool(options.get("WORDS", False)) and columns and fast == "packed"
    own = {"FOLD": fast == "packed", "KEY_FOLD": fast == "packed" and columns, "ASYNC_SCALES": columns,
           "PAGE_IDS": fast is not None, "STEP": columns, "GROUP_ROWS": group_rows}
    launch = {k: v for k, v in options.items() if k not in ("COLUMNS", "WORDS") and own.get(k, True)}
    if group_rows:  # the default as well as asked for: the kernel's tile was sized for it above
        launch["GROUP_ROWS"] = True
    if pages_per_split is None:
        pages_per_split = split_pages(part.pages_used or rows * width, launch.get("num_warps", 4),
                                      _multiprocessors(query.device))
    power_of_two = pages_per_split & (pages_per_split - 1) == 0
    if columns and fast == "packed" and query.device.type == "cuda" and "PAGE_IDS" not in launch:  # the split's
        # page ids as one vector before the loop (a power of two of them): the code loads get two buffers (H200, batch
        # 8 x 32k: kivi:4 0.112 -> 0.104 ms). Float8 pages: no faster (their two buffers leave 6 programs a multiprocessor)
        launch["PAGE_IDS"] = power_of_two and pages_per_split <= PAGE_IDS_UP_TO
    step = launch.get("STEP", 0)
    if step and (step & (step - 1) or not 16 <= step <= page or part.page_tokens):
        raise ValueError(f"launch STEP reads a page STEP tokens a step: a power of two from 16 to the page's {page} "
                         f"tokens (not mixed pages), not {step}")
    if launch.get("PAGE_IDS") and not power_of_two:
        raise ValueError(f"launch PAGE_IDS loads a split's page ids as one vector: pages_per_split must be a power "
                         f"of two, not {pages_per_split}")
    splits = triton.cdiv(width, pages_per_split)
    m = torch.empty(rows, splits, group, device=query.device, dtype=torch.float32)
    l, acc = torch.empty_like(m), torch.empty(rows, splits, group, dim, device=query.device, dtype=torch.float32)
    table = part.table if part.table.shape[1] else torch.zeros(rows, 1, dtype=torch.int32, device=query.device)
    if part.rotation is not None:  # the pages hold x @ R: read them with q @ R, turn the output back below
        query = (query.float() @ part.rotation).contiguous()
    grid = (rows, splits)
    shape = dict(G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=dim, P=page, PAGES_PER_SPLIT=pages_per_split,
                 WINDOWED=window > 0)
    dummy = part.positions  # unused pointers
    if fast == "full" and columns:
        float8_columns_kernel[grid](query, table, part.lengths, part.keys,
                                    part.values.view(torch.uint16), part.positions, part.key_scale, part.value_scale,
                                    m, l, acc, width, splits, q_pos, window, scale, SCALED=part.scaled,
                                    E5M2=part.keys.dtype == torch.float8_e5m2, ASM=query.device.type == "cuda",
                                    **{**shape, "BLOCK_G": max(8, triton.next_power_of_2(group))}, **launch)
    elif fast == "full":
        tile = math.gcd(max(1, tile_tokens // page), pages_per_split)
        full_pages_kernel[grid](query, table, part.lengths, part.keys, part.values, part.positions,
                                part.key_scale if part.scaled else dummy, part.value_scale if part.scaled else dummy,
                                m, l, acc, width, splits, q_pos, window, scale, SCALED=part.scaled, TILE=tile & -tile,
                                **shape, **launch)
    elif fast == "packed":
        smooth = part.key_smooth
        keys = packed_words(part.keys, dim, part.bits, two_bit_words)
        values = packed_words(part.values, dim, part.bits, two_bit_words)
        if group_rows and query.device.type == "cuda" and group_words < 16:  # a group's value dot: >= 16 rows
            raise ValueError(f"launch GROUP_ROWS gives each value group its own dot product: {group_words} words "
                             f"of codes a group is under the 16 rows a GPU tile needs; leave GROUP_ROWS off")
        kernel = kivi_columns_kernel if columns else kivi_pages_kernel
        kernel[grid](query, table, part.lengths, keys, values, part.positions, part.key_scale,
                     part.key_zero, smooth if smooth is not None else dummy, part.value_scale,
                     part.value_zero, part.value_channel if part.value_channel is not None else dummy,
                     m, l, acc, width, splits, q_pos, window, scale, BITS=part.bits,
                     VG=part.value_group, KEY_TOKEN=smooth is not None, PAGE_TOKENS=part.page_tokens,
                     P_PAD=max(16, triton.next_power_of_2(page)) if part.page_tokens else 0,  # dots: K >= 16
                     VALUE_CHANNEL=part.value_channel is not None, ASM=query.device.type == "cuda",
                     **{**shape, "BLOCK_G": packed_rows}, **launch)
    else:  # packed rows narrower than 16 bytes get float32 dots: on an H200, Triton's tensor-core lowering of their
        # tiny tiles gave wrong results (kivi:2, head_dim 32, 16-token pages: relative error 1.0)
        narrow = part.bits and dim * part.bits // 8 < 16
        exact = precise or narrow  # float32 dot products: the query goes in as float32 too
        _general(query.float() if exact else query, table, part, m, l, acc, width, splits, q_pos, window, scale,
                 exact, shape, launch)
    if part.rotation is not None:  # linear in the values, so the split merge (`combine`) is unchanged
        acc = acc @ (part.value_rotation if part.value_rotation is not None else part.rotation).T
    return m, l, acc


def split_pages(pages: int, warps: int, multiprocessors: int) -> int:
    """Pages per program (a power of two: few distinct compilations) so that the pages the rows hold, `pages` in
    all, make about 4 busy programs per multiprocessor (8 of one warp). Sized from what the rows hold, not from
    the longest row: with ragged rows (per-head budgets) a split sized by the longest leaves the short rows' programs
    idle and the GPU under-filled (H200, batch 8 x 32k, heads keeping 5-45%: 77% of the copy bandwidth against
    93% for rows of equal length, `benchmarks/results/decode_kernel_h200.md`)."""
    programs = (8 if warps == 1 else 4) * multiprocessors
    return triton.next_power_of_2(max(1, triton.cdiv(pages, programs)))


def _default_launch(fast: str | None, scaled: int, packed_rows: int) -> dict:
    """Launch options for a part when `paged_decode` is given none (see the constants below)."""
    if fast == "packed":  # one warp for one MMA tile of rows; a few-token turn's taller tile: two
        return PACKED_LAUNCH if packed_rows <= 16 else TALL_PACKED_LAUNCH
    if fast == "full":
        return SCALED_LAUNCH if scaled else FAST_LAUNCH
    return {}  # the general kernel: Triton's defaults


def _general(query, table, part, m, l, acc, width, splits, q_pos, window, scale, precise, shape, launch) -> None:
    dummy = part.positions  # unused pointers for full-precision pages
    _paged_decode_kernel[(query.shape[0], splits)](
        query, table, part.lengths, part.keys, part.values, part.positions,
        part.key_scale if part.key_scale is not None else dummy, part.key_zero if part.bits else dummy,
        part.key_smooth if part.key_smooth is not None else dummy, part.value_scale if part.value_scale is not None else dummy, part.value_zero if part.bits else dummy,
        m, l, acc, width, splits, q_pos, window, scale,
        BITS=part.bits, VG=part.value_group, PRECISE=precise, SCALED=part.scaled,
        KEY_TOKEN=part.key_smooth is not None, **shape, **launch,
    )


# Launch options, the fastest of `benchmarks/ncu_decode.py --sweep` on an H200 (batch 8 x 32k; the tables are in
# benchmarks/results/decode_kernel_h200.md). A `launch` given to `paged_decode` replaces them.
FAST_LAUNCH = dict(num_warps=4, num_stages=2)  # 16-bit pages
SCALED_LAUNCH = dict(num_warps=2, num_stages=3)  # float8 pages
PACKED_LAUNCH = dict(num_warps=1, num_stages=3)  # KIVI and KV4 pages, with 8 programs per multiprocessor:
# kivi:4 0.232 -> 0.192 ms against 2 warps (decode_kernel_h200_sweep_words.json): one warp holds the whole tile,
# so the probabilities become the second dot product's operand in registers and the row reductions need no
# shared memory
TALL_PACKED_LAUNCH = dict(num_warps=2, num_stages=3)  # more than 16 tile rows (a few-token turn): one warp spills
PAGE_IDS_UP_TO = 256  # the columns kernels load at most this many page ids of a split ahead (8 registers a thread)
COLUMNS_UP_TO = 16  # packed rows of at most this many (query, value group) pairs: `kivi_columns_kernel`. H200,
# batch 8 x 32k (decode_kernel_h200_sweep_rows_group{8,16}.json, 2026-12-05): at 16 pairs (GQA 8, two value groups)
# kivi:4 0.181 -> 0.161 ms, kivi:2 0.189 -> 0.134 against `kivi_pages_kernel`; at 32 (GQA 16) the rows kernel stays
# ahead for kivi:4 (0.316 against 0.350) and level for kivi:2 (0.336 against 0.327)
FLOAT8_COLUMNS_UP_TO = 8  # float8 pages read by `float8_columns_kernel` up to this GQA (timed at 4: a scale per page
# 0.216 -> 0.142 ms, per token 0.259 -> 0.173, decode_kernel_h200_sweep_fp8_columns.json; above 8 untimed)
INVARIANT_SPLIT_TOKENS = 512  # tokens per split of a batch-invariant read (`paged_decode(batch_invariant=True)`)
TILE_TOKENS = 64  # 16-bit and float8 pages smaller than this are read several per step: 16-token pages 0.42 -> 0.28 ms


def packed_words(codes: torch.Tensor, dim: int, bits: int, two_bit_words: bool = False) -> torch.Tensor:
    """Packed codes as the packed kernel reads them: 16-bit words of 4- and 8-bit codes where each word's bit
    fields still give every dot product >= 16 channels (head_dim * bits >= 256), else bytes. Two words pair up in
    one 32-bit register as the dot product's operand holds them, so one paired float16 instruction unpacks two
    codes with no widening (bytes are spread first). 2-bit codes stay bytes in the rows kernel: 8 fields a word made
    8 narrow dot products and their accumulators (spills); `two_bit_words` (the columns kernel's `WORDS`): words
    too. A view: the pages' bytes are the same (little-endian: word w holds bytes 2w and 2w + 1, channels
    w * 16 / bits + r)."""
    if (bits >= 4 or two_bit_words) and dim * bits % 16 == 0 and dim * bits // 16 >= 16:
        return codes.view(torch.uint16)
    return codes


def fast_kind(part: PagedPart, dim: int, device) -> str | None:
    """Which fast kernel reads this part for a 16-bit query: "full" (16-bit or scaled float8 pages,
    `fast_decode`), "packed" (KIVI's or KV4's packed pages, `packed_decode`), or None (the general kernel:
    float32 pages, other formats, value groups under 16 channels). On a GPU each bit field's dot product needs
    >= 16 channels."""
    if part.page_tokens:  # mixed pages: only the packed kernel reads them (float16 dots, whatever the query)
        return "packed" if dim * part.bits // 8 >= 16 and part.value_group >= 16 else None
    if part.bits == 0:
        return "full" if part.keys.dtype in (torch.float16, torch.bfloat16) or part.scaled else None
    if part.scaled or part.bits not in (2, 4, 8):
        return None
    if part.value_group < 16:  # the packed kernel gives each value group its own tile rows
        return None
    return "packed" if device.type != "cuda" or dim * part.bits // 8 >= 16 else None


def supports(parts: list[PagedPart], dim: int) -> bool:
    """Whether the kernel compiles for these parts on a GPU: Triton's tiles need pages of a power-of-two number of
    tokens, >= 16, and a power-of-two head_dim >= 16; mixed pages (`page_tokens`) any number of slots, and
    bytes of >= 16 channels per bit field (the packed kernel reads them)."""
    return dim >= 16 and not dim & (dim - 1) and all(
        fast_kind(p, dim, torch.device("cuda")) == "packed" if p.page_tokens else
        (size := p.positions.shape[1]) >= 16 and not size & (size - 1) for p in parts)


def combine(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, out_dtype: torch.dtype = torch.float32,
            ordered: bool = False) -> torch.Tensor:
    """Merge partial softmaxes [rows, splits, group(, dim)] into the attention output [rows, group, dim], in one
    kernel (`common.combine_kernel`); rows that saw no key get zeros. `combine_reference` is its meaning.
    `ordered`: add the splits one at a time, in order, instead of in blocks summed as trees."""
    rows, splits, group, dim = acc.shape
    out = torch.empty(rows, group, dim, device=acc.device, dtype=out_dtype)
    block = 1 if ordered else min(16, triton.next_power_of_2(splits))
    combine_kernel[(rows, group)](m, l, acc, out, splits, G=group, D=dim, BLOCK_S=block,
                                  INTERPRETED_END=splits if os.environ.get("TRITON_INTERPRET") == "1" else 0)
    return out


def combine_reference(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """What `combine` computes, in PyTorch (float32)."""
    top = m.amax(dim=1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(m - top)
    denom = (l * weight).sum(dim=1)
    out = (acc * weight.unsqueeze(-1)).sum(dim=1)
    return out / denom.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)


def write_tokens(pool: dict[str, torch.Tensor], table: torch.Tensor, lengths: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, position: torch.Tensor) -> None:
    """`pages.PagedRows.write_next` of the fast loop in one kernel: keys and values [rows, dim] into slot
    `lengths[r]` of each row's pages (`pool` {"k", "v": [pages, P, dim], "pos": [pages, P]}), `position` (one
    element for every row, or one per row) into the row's slot, then lengths + 1. `table` and `lengths` are device
    tensors, updated in place."""
    k, v, pos = pool["k"], pool["v"], pool["pos"]
    rows, dim = keys.shape
    if not (k.is_contiguous() and v.is_contiguous() and pos.is_contiguous() and table.is_contiguous()
            and keys.stride(1) == 1 and values.stride(1) == 1 and keys.stride(0) == values.stride(0)):
        raise ValueError("write_tokens needs contiguous pools and page tables, and key/value rows of unit stride")
    if position.numel() not in (1, rows) or not position.is_contiguous():
        raise ValueError(f"write_tokens: position needs 1 or {rows} contiguous elements, got {position.numel()}")
    write_token_kernel[(rows,)](table, lengths, table.shape[1], k, v, pos, keys, values, keys.stride(0), position,
                                int(position.numel() > 1), P=k.shape[1], D=dim, num_warps=1)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def paged_decode(query: torch.Tensor, parts: list[PagedPart], q_pos: int | torch.Tensor, scale: float,
                 sliding_window: int | None = None, pages_per_split: int | None = None,
                 launch: dict | None = None, tile_tokens: int = TILE_TOKENS,
                 out_dtype: torch.dtype = torch.float32,
                 also: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 batch_invariant: bool = False) -> torch.Tensor:
    """Attention of one query token per row ([rows, group, dim]) over the stored parts: [rows, group, dim], float32
    or `out_dtype` (the fast loop asks for the model's dtype: the split merge writes it, no extra cast).
    `also`: a partial softmax (m, l [rows, 1, group], acc [rows, 1, group, dim], float32, natural-log units) over
    keys that are not in the pages, merged with theirs: the tokens of a multi-token turn (`new_tokens_partials`).

    Keys must all precede the query (true when decoding); `sliding_window` masks keys older than the window.
    `q_pos`, the query's sequence index, may be a one-element device tensor: the kernel reads it from memory, so a
    captured CUDA graph replays with the value of each step.
    A float32 query gets float32 dot products (matching the reference to ~1e-6); 16-bit queries get bfloat16
    tensor-core dot products with float32 accumulation (relative error ~1e-3, stated by the GPU tests).
    `launch` overrides Triton's launch options (num_warps, num_stages) and kernel constants, for
    `benchmarks/decode_kernel.py --sweep`; for packed pages `COLUMNS` 1 or 0 picks `kivi_columns_kernel` or
    `kivi_pages_kernel` (default: columns for rows of at most `COLUMNS_UP_TO` (query, value group) pairs), and
    `WORDS` 1 (the default on CUDA) has the columns kernel read 2-bit codes as 16-bit words (`packed_words`), and
    `GROUP_ROWS` 1 gives it the queries alone as columns and each value group its own output rows (the default
    where G × value groups > 8; on a GPU a group needs 16 words of codes, so 2-bit codes are then read as bytes); for
    scaled float8 pages `COLUMNS` 1 or 0 picks `float8_decode.float8_columns_kernel` or `full_pages_kernel`
    (default: columns for at most `FLOAT8_COLUMNS_UP_TO` query heads per KV head and pages of at least
    `TILE_TOKENS`).
    `tile_tokens`: 16-bit and float8 pages smaller than this are read this many tokens per step (several pages at
    once, a power of two of them that divides the split; 0: one page per step).
    Mixed pages (ZipCache's, `page_tokens`) are read with float16 dot products whatever the query's dtype, and not
    in sliding-window layers.
    `batch_invariant`: each row's output does not depend on the other rows (their number, lengths and tables),
    bit for bit: splits hold a fixed number of tokens (`INVARIANT_SPLIT_TOKENS`) instead of a share of the GPU
    chosen from the batch, and the merge adds splits one at a time in order (an empty split adds exact zeros
    wherever the others' widths put it). A server's joint step uses it, so a request's greedy answer does not
    depend on which requests it shared steps with.
    """
    if any(p.page_tokens and (sliding_window or not supports([p], query.shape[-1])) for p in parts):
        raise ValueError("paged_decode: mixed-precision pages need bit fields of >= 16 channels and no sliding window")
    precise = query.dtype == torch.float32
    # 16-bit queries are read as they are (the kernels cast them to their dot type); others as float32
    query = (query if query.dtype in (torch.float16, torch.bfloat16) else query.float()).contiguous()
    if not isinstance(q_pos, torch.Tensor):
        q_pos = torch.full((1,), q_pos, dtype=torch.int32, device=query.device)  # a fill kernel: no host sync
    if tile_tokens < 0:
        raise ValueError(f"paged_decode: tile_tokens must be >= 0 (0: one page per step), got {tile_tokens}")
    pieces = [_partials(query, part, q_pos, sliding_window or 0, scale, pages_per_split, precise, launch or {},
                        tile_tokens, batch_invariant)
              for part in parts] + ([tuple(t.contiguous() for t in also)] if also is not None else [])
    m, l, acc = pieces[0] if len(pieces) == 1 else (torch.cat([p[i] for p in pieces], dim=1) for i in range(3))
    return combine(m, l, acc, out_dtype, ordered=batch_invariant)


def new_tokens_partials(query: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        valid: torch.Tensor, key_positions: torch.Tensor, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial softmax of a few queries over a turn's own tokens, causal by position, for `paged_decode(also=)`:
    query [rows, group, n, dim] at `positions` [n]; keys, values [rows, t, dim], valid and key_positions [rows, t].
    Returns m, l [rows, 1, group * n] and acc [rows, 1, group * n, dim] (float32), the layout of the kernels'
    splits with the n queries as n times the group's heads."""
    rows, group, n, dim = query.shape
    scores = torch.einsum("rgnd,rtd->rgnt", query.float(), keys.float()) * scale
    visible = valid[:, None, None, :] & (key_positions[:, None, None, :] <= positions.view(1, 1, n, 1))
    scores = scores.masked_fill(~visible, float("-inf"))
    m = scores.amax(dim=-1)
    weights = torch.exp(scores - torch.where(torch.isinf(m), torch.zeros_like(m), m).unsqueeze(-1))
    acc = torch.einsum("rgnt,rtd->rgnd", weights, values.float())
    return (m.reshape(rows, 1, group * n), weights.sum(-1).reshape(rows, 1, group * n),
            acc.reshape(rows, 1, group * n, dim))
