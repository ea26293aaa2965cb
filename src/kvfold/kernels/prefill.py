"""Low-bit prefill attention (SageAttention2's recipe, arXiv:2411.10958, in Triton): Q and smoothed K in int8
per block, int8 tensor-core dot products for the scores, P·V in 16-bit, causal, GQA.

`int8_prefill(query, key, value, scale)` computes `reference.int8_prefill_attention` (tested equal under
TRITON_INTERPRET=1 on the CPU; on a GPU by `benchmarks/prefill_kernel.py`, which also times it against SDPA).
The quantization pre-pass (`reference.int8_blocks` over `reference.smooth_keys`) runs in PyTorch: the kernel
reads int8 Q and K (half the bytes of 16-bit) and 16-bit V. Approximate: Q and K are rounded to 127 levels per
block; P is rounded to the value dtype before P·V (accumulated in float32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import softmax_step
from .reference import int8_blocks, smooth_keys


@triton.jit
def _key_block(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head, q_len, kv_len, kv_blocks,
               D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [start, start + BLOCK_N) into the running softmax of the query block."""
    keys = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(k_ptr + (kv_head * kv_len + keys[:, None]) * D + offs_d[None, :], mask=keys[:, None] < kv_len, other=0)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    s = s * (q_scale * tl.load(ks_ptr + kv_head * kv_blocks + start // BLOCK_N, mask=start < kv_len, other=0.0))
    visible = (keys[None, :] <= offs_m[:, None] + kv_len - q_len) & (keys[None, :] < kv_len)
    p, alpha, m_i, l_i = softmax_step(s, visible, m_i, l_i, 1.0)  # s already carries the scales
    v = tl.load(v_ptr + (kv_head * kv_len + keys[:, None]) * D + offs_d[None, :], mask=keys[:, None] < kv_len,
                other=0.0)
    return m_i, l_i, tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _int8_prefill_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, out_ptr, q_len, kv_len, q_blocks, kv_blocks, scale,
                         Q_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED_BLOCKS: tl.constexpr):
    block = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)  # batch * q_heads + q_head (64-bit: offsets pass 2**31 at long contexts)
    kv_head = (head // Q_HEADS) * (Q_HEADS // GROUP) + (head % Q_HEADS) // GROUP
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (head * q_len + offs_m[:, None]) * D + offs_d[None, :], mask=offs_m[:, None] < q_len, other=0)
    q_scale = tl.load(qs_ptr + head * q_blocks + block) * scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if INTERPRETED_BLOCKS:  # Triton's interpreter loops only to constants: every key block, the causal mask applied
        for start in range(0, INTERPRETED_BLOCKS * BLOCK_N, BLOCK_N):
            m_i, l_i, acc = _key_block(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head, q_len,
                                       kv_len, kv_blocks, D, BLOCK_N)
    else:  # causal: no key past the block's last query
        for start in range(0, tl.minimum((block + 1) * BLOCK_M + kv_len - q_len, kv_len), BLOCK_N):
            m_i, l_i, acc = _key_block(q, q_scale, start, offs_m, m_i, l_i, acc, k_ptr, ks_ptr, v_ptr, kv_head, q_len,
                                       kv_len, kv_blocks, D, BLOCK_N)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + (head * q_len + offs_m[:, None]) * D + offs_d[None, :], out, mask=offs_m[:, None] < q_len)


def int8_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, block_m: int = 64,
                 block_n: int = 64, launch: dict | None = None) -> torch.Tensor:
    """Causal attention [batch, q_heads, q_len, dim] (float32) of the last q_len positions over key/value [batch,
    kv_heads, kv_len, dim] (16-bit values; GQA), scores from int8 Q and smoothed int8 K; see the module doc."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads or q_len > kv_len or value.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("int8_prefill: q_heads must be a multiple of kv_heads, q_len <= kv_len, values 16-bit")
    q_codes, q_scales = int8_blocks(query, block_m)
    k_codes, k_scales = int8_blocks(smooth_keys(key.float()), block_n)
    out = torch.empty(batch, q_heads, q_len, dim, device=query.device, dtype=torch.float32)
    grid = (triton.cdiv(q_len, block_m), batch * q_heads)
    interpreted = triton.cdiv(kv_len, block_n) if os.environ.get("TRITON_INTERPRET") == "1" else 0
    _int8_prefill_kernel[grid](q_codes.contiguous(), q_scales.contiguous(), k_codes.contiguous(),
                               k_scales.contiguous(), value.contiguous(), out, q_len, kv_len, q_scales.shape[-1],
                               k_scales.shape[-1], scale, Q_HEADS=q_heads, GROUP=q_heads // kv_heads, D=dim,
                               BLOCK_M=block_m, BLOCK_N=block_n, INTERPRETED_BLOCKS=interpreted,
                               **(launch or {}))
    return out
