"""Pieces shared by the decode kernels (`decode`'s general one and `fast_decode`'s): a row's query tile, the page
walk, the online softmax and its partial results, which `decode.combine` merges across splits and parts."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def query_tile(q_ptr, row, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr):
    """The row's GQA group of queries, float32 [BLOCK_G, D] (rows past G are zero)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    return tl.load(q_ptr + row * G * D + offs_g[:, None] * D + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)


@triton.jit
def empty_state(BLOCK_G: tl.constexpr, D: tl.constexpr):
    """The online softmax before any key: running max, running sum, output accumulator."""
    return (tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32),
            tl.zeros([BLOCK_G, D], tl.float32))


@triton.jit
def page_rows(table_ptr, row, width, page_index, length, P: tl.constexpr):
    """This row's page id at `page_index` (0 past the row's end: its loads are masked) and its valid slots."""
    page = tl.load(table_ptr + row * width + page_index, mask=page_index * P < length, other=0).to(tl.int64)
    return page, page_index * P + tl.arange(0, P) < length


@triton.jit
def padded_page_rows(table_ptr, row, width, page_index, length, P: tl.constexpr, P_PAD: tl.constexpr):
    """`page_rows` for P slots of any number, padded to the power of two P_PAD (the padding is never valid)."""
    page = tl.load(table_ptr + row * width + page_index, mask=page_index * P < length, other=0).to(tl.int64)
    slots = tl.arange(0, P_PAD)
    return page, (page_index * P + slots < length) & (slots < P)


@triton.jit
def softmax_update(s, m_i, l_i, BASE2: tl.constexpr = False):
    """One tile of scaled scores [queries, keys] (-inf where hidden) into the running softmax: returns p, the
    rescale factor alpha, and the new m, l. BASE2: the scores are already times log2(e) and exponentiate in base
    2 (one multiply less per score; m is then in base 2 too)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if BASE2:
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def softmax_step(s, visible, m_i, l_i, scale):
    """`softmax_update` of raw scores, scaled, hidden where `visible` (a mask broadcastable to them) is false."""
    return softmax_update(tl.where(visible, s * scale, float("-inf")), m_i, l_i)


@triton.jit
def window_mask(valid, pos_ptr, page, qpos_ptr, window, P: tl.constexpr, WINDOWED: tl.constexpr):
    if WINDOWED:
        pos = tl.load(pos_ptr + page * P + tl.arange(0, P))
        valid = valid & (pos > tl.load(qpos_ptr) - window)
    return valid


@triton.jit
def store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G: tl.constexpr, BLOCK_G: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    out = (row * splits + split) * G + offs_g
    tl.store(m_ptr + out, m_i, mask=offs_g < G)
    tl.store(l_ptr + out, l_i, mask=offs_g < G)
    return out
