"""Low-bit prefill attention (SageAttention2's recipe, arXiv:2411.10958, in Triton): Q and smoothed K in int8
per block, int8 tensor-core dot products for the scores, P·V in 16-bit (or float8: `pv_fp8`), causal, GQA.

`int8_prefill(query, key, value, scale)` computes `reference.int8_prefill_attention` (tested equal under
TRITON_INTERPRET=1 on the CPU; on a GPU by `benchmarks/prefill_kernel.py`, which also times it against SDPA).
A Triton pre-pass (`_quantize_kernel`) writes the int8 codes and one scale per `QUANT_BLOCK` queries and per
`KEY_BLOCK` keys in one read of Q and of K (K minus its per-channel mean); the attention kernel then reads int8 Q
and K (half the bytes of 16-bit) and 16-bit V, on Hopper through tensor descriptors (bulk copies). Key tiles every
query of a tile sees run without the causal mask; only the tiles across the diagonal pay for it, and the longest
query tiles start first. With one key scale per key tile, both scales ride on the exponent's multiply-add.
Approximate: Q and K are rounded to 127 levels per block (half away from zero, the reference to even: they differ
on exact ties only); P is rounded to the value dtype before P·V (accumulated in float32), or with `pv_fp8` P × 448
and V per channel to float8 e4m3 (3 mantissa bits: cosine 0.9994 against exact attention on an H200,
`benchmarks/results/prefill_kernel_h200.md`); the output is in the value dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import INT8_BLOCKS


LOG2E = 1.4426950408889634  # scores are kept in base 2: exp2 is the hardware's exponential
QUANT_BLOCK = INT8_BLOCKS["block_m"]  # queries per int8 scale
KEY_BLOCK = INT8_BLOCKS["block_n"]  # keys per int8 scale: one per key tile of BLOCK_N, folded into the query's scale
# fastest of the H200 sweep at 16k (benchmarks/results/prefill_kernel_h200.md): 3.69 ms against 4.78 for 128 x 128
# tiles of 8 warps with a scale per 64 keys and pointer loads
PREFILL_LAUNCH = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "TMA": True}


@triton.jit
def _quantize_kernel(x_ptr, mean_ptr, codes_ptr, scales_ptr, tokens, groups, D: tl.constexpr, BLOCK: tl.constexpr,
                     SMOOTH: tl.constexpr):
    """One block of `BLOCK` tokens of one head: codes = round(x' / s), s = max |x'| / 127, x' = x (- mean)."""
    block = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    at = (head * tokens + rows[:, None]) * D + offs_d[None, :]
    x = tl.load(x_ptr + at, mask=rows[:, None] < tokens, other=0.0).to(tl.float32)
    if SMOOTH:
        x = tl.where(rows[:, None] < tokens, x - tl.load(mean_ptr + head * D + offs_d)[None, :], 0.0)
    step = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-8) / 127
    scaled = x / step
    codes = tl.minimum(tl.maximum(tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5), -127.0), 127.0)
    tl.store(codes_ptr + at, codes.to(tl.int8), mask=rows[:, None] < tokens)
    tl.store(scales_ptr + head * groups + block, step)


def int8_codes(x: torch.Tensor, block: int, smooth: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.int8_blocks(x)` (of `reference.smooth_keys(x)` if `smooth`) in one Triton pass."""
    *lead, tokens, dim = x.shape
    x = x.contiguous()
    heads = x.numel() // max(tokens * dim, 1)
    groups = triton.cdiv(tokens, block)
    codes = torch.empty(x.shape, device=x.device, dtype=torch.int8)
    scales = torch.empty(*lead, groups, device=x.device, dtype=torch.float32)
    mean = x.mean(dim=-2, dtype=torch.float32).contiguous() if smooth else scales  # no float32 copy of x
    _quantize_kernel[(groups, heads)](x, mean, codes, scales, tokens, groups, D=dim, BLOCK=block, SMOOTH=smooth)
    return codes, scales


@triton.jit
def _key_tile(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head, kv_len, k_groups, offset,
              v_stride, D: tl.constexpr, BLOCK_N: tl.constexpr, K_GROUP: tl.constexpr, MASKED: tl.constexpr,
              PV_FP8: tl.constexpr, TMA: tl.constexpr = False):
    """Keys [start, start + BLOCK_N) into the running softmax of the query tile; MASKED: the causal mask and the
    end of the keys apply (else every query of the tile sees every key of this one). PV_FP8: values are float8
    codes stored transposed ([D, tokens], row stride `v_stride`) and P is scaled by 448 into float8 for the dot.
    TMA (16-bit values): k_ptr and v_ptr are tensor descriptors over all heads' rows (Hopper's bulk copies); a
    tile that runs past the head's keys reads the next head's (or zeros), which the mask hides (probability 0)."""
    keys = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    at = (kv_head * kv_len + keys[:, None]) * D + offs_d[None, :]
    if TMA:
        k = k_ptr.load([(kv_head * kv_len + start).to(tl.int32), 0])
    elif MASKED:
        k = tl.load(k_ptr + at, mask=keys[:, None] < kv_len, other=0)
    else:
        k = tl.load(k_ptr + at)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    if K_GROUP % BLOCK_N == 0:  # one key scale for the whole tile: it joins the query's, one multiply per score
        row_scale = q_scale * tl.load(ks_ptr + kv_head * k_groups + start // K_GROUP)
    else:
        if MASKED:
            k_scale = tl.load(ks_ptr + kv_head * k_groups + keys // K_GROUP, mask=keys < kv_len, other=0.0)
        else:
            k_scale = tl.load(ks_ptr + kv_head * k_groups + keys // K_GROUP)
        s = s * k_scale[None, :]
        row_scale = q_scale
    if MASKED:
        s = tl.where((keys[None, :] <= offs_m[:, None] + offset) & (keys[None, :] < kv_len), s, float("-inf"))
    # the softmax of s * row_scale (row_scale > 0), the scale folded into the exponent's multiply-add
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * row_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * row_scale[:, None] - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    m_i, l_i = m_new, l_i * alpha + tl.sum(p, axis=1)
    if PV_FP8:
        at_t = (kv_head * D + offs_d[:, None]) * v_stride + keys[None, :]
        vt = tl.load(v_ptr + at_t, mask=keys[None, :] < kv_len, other=0.0) if MASKED else tl.load(v_ptr + at_t)
        return m_i, l_i, tl.dot((p * 448.0).to(vt.dtype), tl.trans(vt), acc * alpha[:, None])
    if TMA:
        v = v_ptr.load([(kv_head * kv_len + start).to(tl.int32), 0])
    else:
        v = tl.load(v_ptr + at, mask=keys[:, None] < kv_len, other=0.0) if MASKED else tl.load(v_ptr + at)
    return m_i, l_i, tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _int8_prefill_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, out_ptr, q_len, kv_len, q_groups, k_groups,
                         v_stride, scale, Q_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                         Q_GROUP: tl.constexpr, K_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         PV_FP8: tl.constexpr, INTERPRETED_BLOCKS: tl.constexpr, TMA: tl.constexpr = False):
    block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last) query tiles first
    head = tl.program_id(1).to(tl.int64)  # batch * q_heads + q_head (64-bit: offsets pass 2**31 at long contexts)
    kv_head = (head // Q_HEADS) * (Q_HEADS // GROUP) + (head % Q_HEADS) // GROUP
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (head * q_len + offs_m[:, None]) * D + offs_d[None, :], mask=offs_m[:, None] < q_len, other=0)
    # > 0 on every row (rows past q_len too: -inf * 0 would be NaN), times the softmax scale in base 2
    q_scale = tl.load(qs_ptr + head * q_groups + offs_m // Q_GROUP, mask=offs_m < q_len, other=1.0) * scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    offset = kv_len - q_len  # query i sits at position i + offset: it sees keys <= i + offset
    # keys before `full_end` are seen by every query of the tile; none at or past `end` by any
    full_end = tl.minimum((block * BLOCK_M + offset + 1) // BLOCK_N, kv_len // BLOCK_N) * BLOCK_N
    end = tl.minimum((block + 1) * BLOCK_M + offset, kv_len)
    if INTERPRETED_BLOCKS:  # Triton's interpreter loops only to constants
        for start in range(0, INTERPRETED_BLOCKS * BLOCK_N, BLOCK_N):
            if start < full_end:
                m_i, l_i, acc = _key_tile(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head,
                                          kv_len, k_groups, offset, v_stride, D, BLOCK_N, K_GROUP, False, PV_FP8,
                                          TMA)
            elif start < end:
                m_i, l_i, acc = _key_tile(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head,
                                          kv_len, k_groups, offset, v_stride, D, BLOCK_N, K_GROUP, True, PV_FP8,
                                          TMA)
    else:
        for start in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _key_tile(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head, kv_len,
                                      k_groups, offset, v_stride, D, BLOCK_N, K_GROUP, False, PV_FP8, TMA)
        for start in range(full_end, end, BLOCK_N):
            m_i, l_i, acc = _key_tile(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head, kv_len,
                                      k_groups, offset, v_stride, D, BLOCK_N, K_GROUP, True, PV_FP8, TMA)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    if PV_FP8:  # undo P's 448 and the values' per-channel scales
        out = out * (tl.load(vs_ptr + kv_head * D + offs_d) / 448.0)[None, :]
    tl.store(out_ptr + (head * q_len + offs_m[:, None]) * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < q_len)


def fp8_values(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [..., tokens, dim] as float8 e4m3 codes with one scale per channel (max |v| / 448), stored
    transposed [..., dim, tokens rounded up to 16] for the kernel's P·V: (codes, scales [..., dim] float32)."""
    scales = value.float().abs().amax(dim=-2).clamp_min(1e-8) / 448
    codes = (value.float() / scales[..., None, :]).to(torch.float8_e4m3fn).transpose(-1, -2)
    return torch.nn.functional.pad(codes.view(torch.uint8), (0, -value.shape[-2] % 16)).view(
        torch.float8_e4m3fn).contiguous(), scales.contiguous()


def use_tma(options: dict, pv_fp8: bool, k_codes: torch.Tensor, values: torch.Tensor) -> bool:
    """Tensor descriptors where asked and possible: 16-bit values, a Hopper or newer GPU (or the interpreter), and
    16-byte aligned bases (a value tensor may be a view at any offset)."""
    on_hopper = values.device.type != "cuda" or torch.cuda.get_device_capability(values.device)[0] >= 9
    aligned = k_codes.data_ptr() % 16 == 0 and values.data_ptr() % 16 == 0
    return bool(options.get("TMA")) and not pv_fp8 and on_hopper and aligned


def tile_sources(k_codes: torch.Tensor, values: torch.Tensor, options: dict, pv_fp8: bool) -> tuple:
    """The kernel's key and value arguments and its TMA flag: the tensors, or where `use_tma` allows, tensor
    descriptors over every head's rows, read by Hopper's bulk copies."""
    if not use_tma(options, pv_fp8, k_codes, values):
        return k_codes, values, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    dim, block_n = k_codes.shape[-1], options["BLOCK_N"]
    return (TensorDescriptor.from_tensor(k_codes.view(-1, dim), [block_n, dim]),
            TensorDescriptor.from_tensor(values.view(-1, dim), [block_n, dim]), True)


def int8_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                 q_block: int = QUANT_BLOCK, k_block: int = KEY_BLOCK, launch: dict | None = None,
                 pv_fp8: bool = False) -> torch.Tensor:
    """Causal attention [batch, q_heads, q_len, dim] (value dtype) of the last q_len positions over key/value
    [batch, kv_heads, kv_len, dim] (16-bit values; GQA), scores from int8 Q (one scale per `q_block` queries) and
    smoothed int8 K (per `k_block` keys); `launch`: tiles and launch options over `PREFILL_LAUNCH` (TMA: keys and
    16-bit values through tensor descriptors where `use_tma` allows). A key block that is a multiple of BLOCK_N
    gives each key tile one scale, folded into the query's: one multiply per score less. pv_fp8: P·V in float8
    too (values per channel, `fp8_values`; P times 448), SageAttention2's second step."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads or q_len > kv_len or value.dtype not in (torch.float16, torch.bfloat16) or dim < 32:
        raise ValueError("int8_prefill: q_heads must be a multiple of kv_heads, q_len <= kv_len, values 16-bit, "
                         "head_dim >= 32 (int8 tensor-core dots reduce over at least 32)")
    options = {**PREFILL_LAUNCH, **(launch or {})}
    q_codes, q_scales = int8_codes(query, q_block, smooth=False)
    k_codes, k_scales = int8_codes(key, k_block, smooth=True)
    values, value_scales = fp8_values(value) if pv_fp8 else (value.contiguous(), k_scales)
    v_stride = values.shape[-1]
    out = torch.empty(batch, q_heads, q_len, dim, device=query.device, dtype=value.dtype)
    grid = (triton.cdiv(q_len, options["BLOCK_M"]), batch * q_heads)
    keys, values, tma = tile_sources(k_codes, values, options, pv_fp8)
    interpreted = triton.cdiv(kv_len, options["BLOCK_N"]) if os.environ.get("TRITON_INTERPRET") == "1" else 0
    _int8_prefill_kernel[grid](q_codes, q_scales, keys, k_scales, values, value_scales, out, q_len, kv_len,
                               q_scales.shape[-1], k_scales.shape[-1], v_stride, scale * LOG2E,
                               Q_HEADS=q_heads, GROUP=q_heads // kv_heads, D=dim, Q_GROUP=q_block, K_GROUP=k_block,
                               PV_FP8=pv_fp8, INTERPRETED_BLOCKS=interpreted,
                               **{**options, "TMA": tma})
    return out
