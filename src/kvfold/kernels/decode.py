"""Triton decode attention over kvfold's paged store (flash-decoding over per-row page tables).

One program handles one row (a batch element's KV head, with all its GQA query heads) over a split of its pages:
it loads each page, de-quantizes packed KIVI pages (or scaled float8 pages) in registers (codes never expand in
HBM), and keeps an online softmax. Splits and the store's parts (packed pages, full-precision tail) are merged by
`combine`. The meaning is `reference.paged_attention`; tests compare the two under TRITON_INTERPRET=1 on the CPU
and at full size on a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


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
    q = tl.load(q_ptr + row * G * D + offs_g[:, None] * D + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    if not PRECISE:
        q = q.to(tl.bfloat16)
    # No branch inside the loop (pages past the row's end are masked, not skipped), so the compiler can pipeline
    # the page-table and page loads across iterations; splits past the row's end skip the loop as a whole.
    if split * PAGES_PER_SPLIT * P < length:
        for i in range(PAGES_PER_SPLIT):
            page_index = split * PAGES_PER_SPLIT + i
            in_row = page_index * P < length
            page = tl.load(table_ptr + row * width + page_index, mask=in_row, other=0).to(tl.int64)
            valid = page_index * P + offs_p < length
            if WINDOWED:
                pos = tl.load(pos_ptr + page * P + offs_p)
                valid = valid & (pos > tl.load(qpos_ptr) - window)
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
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k.to(tl.bfloat16))) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if PRECISE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
            m_i = m_new
    out = (row * splits + split) * G + offs_g
    tl.store(m_ptr + out, m_i, mask=offs_g < G)
    tl.store(l_ptr + out, l_i, mask=offs_g < G)
    tl.store(acc_ptr + out[:, None] * D + offs_d[None, :], acc, mask=offs_g[:, None] < G)


def _partials(query: torch.Tensor, part: PagedPart, q_pos: torch.Tensor, window: int, scale: float,
              pages_per_split: int | None, precise: bool, launch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, group, dim = query.shape
    page = part.positions.shape[1]
    width = max(1, part.table.shape[1])
    if pages_per_split is None:  # enough programs to fill the GPU: about 4 per multiprocessor
        target = triton.cdiv(4 * _multiprocessors(query.device), rows)
        pages_per_split = triton.next_power_of_2(triton.cdiv(width, max(1, target)))  # few distinct compilations
    splits = triton.cdiv(width, pages_per_split)
    m = torch.empty(rows, splits, group, device=query.device, dtype=torch.float32)
    l, acc = torch.empty_like(m), torch.empty(rows, splits, group, dim, device=query.device, dtype=torch.float32)
    table = part.table if part.table.shape[1] else torch.zeros(rows, 1, dtype=torch.int32, device=query.device)
    dummy = part.positions  # unused pointers for full-precision pages
    if part.rotation is not None:  # the pages hold x @ R: read them with q @ R, turn the output back below
        query = (query @ part.rotation).contiguous()
    _paged_decode_kernel[(rows, splits)](
        query, table, part.lengths, part.keys, part.values, part.positions,
        part.key_scale if part.key_scale is not None else dummy, part.key_zero if part.bits else dummy,
        part.key_smooth if part.key_smooth is not None else dummy, part.value_scale if part.value_scale is not None else dummy, part.value_zero if part.bits else dummy,
        m, l, acc, width, splits, q_pos, window, scale,
        G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=dim, P=page,
        BITS=part.bits, VG=part.value_group, PRECISE=precise, PAGES_PER_SPLIT=pages_per_split, SCALED=part.scaled,
        KEY_TOKEN=part.key_smooth is not None, WINDOWED=window > 0, **launch,
    )
    if part.rotation is not None:  # linear in the values, so the split merge (`combine`) is unchanged
        acc = acc @ (part.value_rotation if part.value_rotation is not None else part.rotation).T
    return m, l, acc


def supports(parts: list[PagedPart], dim: int) -> bool:
    """Whether the kernel compiles for these parts on a GPU: Triton's dot needs pages of >= 16 tokens and a
    power-of-two head_dim >= 16."""
    return dim >= 16 and not dim & (dim - 1) and all(p.positions.shape[1] >= 16 for p in parts)


def combine(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Merge partial softmaxes [rows, splits, group(, dim)] into the attention output [rows, group, dim]."""
    top = m.amax(dim=1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(m - top)
    denom = (l * weight).sum(dim=1)
    out = (acc * weight.unsqueeze(-1)).sum(dim=1)
    return out / denom.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def paged_decode(query: torch.Tensor, parts: list[PagedPart], q_pos: int | torch.Tensor, scale: float,
                 sliding_window: int | None = None, pages_per_split: int | None = None,
                 launch: dict | None = None) -> torch.Tensor:
    """Attention of one query token per row ([rows, group, dim]) over the stored parts; float32 [rows, group, dim].

    Keys must all precede the query (true when decoding); `sliding_window` masks keys older than the window.
    `q_pos`, the query's sequence index, may be a one-element device tensor: the kernel reads it from memory, so a
    captured CUDA graph replays with the value of each step.
    A float32 query gets float32 dot products (matching the reference to ~1e-6); 16-bit queries get bfloat16
    tensor-core dot products with float32 accumulation (relative error ~1e-3, stated by the GPU tests).
    `launch` overrides Triton's launch options (num_warps, num_stages), for `benchmarks/decode_kernel.py --sweep`.
    """
    precise = query.dtype == torch.float32
    query = query.float().contiguous()
    if not isinstance(q_pos, torch.Tensor):
        q_pos = torch.tensor([q_pos], dtype=torch.int32, device=query.device)
    pieces = [_partials(query, part, q_pos, sliding_window or 0, scale, pages_per_split, precise, launch or {})
              for part in parts]
    m, l, acc = (torch.cat([p[i] for p in pieces], dim=1) for i in range(3))
    return combine(m, l, acc)
