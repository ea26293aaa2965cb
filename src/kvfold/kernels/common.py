"""Pieces shared by the decode kernels (`decode`'s general one and `fast_decode`'s): a row's query tile, the page
walk, the online softmax and its partial results, the kernel that merges them across splits and parts
(`decode.combine`), and the fast loop's one-kernel token write (`pages.PagedRows.write_next`). The last two replace
a dozen small PyTorch kernels each per layer and step: at batch 4 x 32k on an H200 the decode step's kernels outside
the matrix products and the attention took 4.3 of 12.7 ms (`benchmarks/profile_decode.py`)."""

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
def page_id(table_ptr, row, width, page_index, length, P: tl.constexpr, ids=0, i=0, PAGE_IDS: tl.constexpr = False):
    """This row's page id at `page_index` (0 past the row's end: its loads are masked), loaded from the table; or
    (PAGE_IDS) item i of `ids`, the split's ids loaded before the page loop (`split_page_ids`)."""
    if PAGE_IDS:
        page = split_item(ids, i)
    else:
        page = tl.load(table_ptr + row * width + page_index, mask=page_index * P < length, other=0)
    return page.to(tl.int64)


@triton.jit
def page_rows(table_ptr, row, width, page_index, length, P: tl.constexpr, ids=0, i=0, PAGE_IDS: tl.constexpr = False):
    """This row's page id at `page_index` (`page_id`) and its valid slots."""
    page = page_id(table_ptr, row, width, page_index, length, P, ids, i, PAGE_IDS)
    return page, page_index * P + tl.arange(0, P) < length


@triton.jit
def padded_page_rows(table_ptr, row, width, page_index, length, P: tl.constexpr, P_PAD: tl.constexpr, ids=0, i=0,
                     PAGE_IDS: tl.constexpr = False):
    """`page_rows` for P slots of any number, padded to the power of two P_PAD (the padding is never valid)."""
    page = page_id(table_ptr, row, width, page_index, length, P, ids, i, PAGE_IDS)
    slots = tl.arange(0, P_PAD)
    return page, (page_index * P + slots < length) & (slots < P)


@triton.jit
def step_slots(table_ptr, row, width, first, i, length, pos_ptr, qpos_ptr, window, P: tl.constexpr,
               STEP: tl.constexpr, WINDOWED: tl.constexpr, ids, PAGE_IDS: tl.constexpr):
    """Step i of a split read STEP tokens a step (P // STEP steps a page): the split's page index, its page id,
    the step's first slot in the page, its slots and which of them are valid."""
    SUB: tl.constexpr = P // STEP
    index = i // SUB
    page = page_id(table_ptr, row, width, first + index, length, P, ids, index, PAGE_IDS)
    start = (i % SUB) * STEP
    slots = start + tl.arange(0, STEP)
    valid = (first + index) * P + slots < length
    return index, page, start, slots, window_mask(valid, pos_ptr, page, qpos_ptr, window, P, WINDOWED, start)


@triton.jit
def split_page_ids(table_ptr, row, width, first, length, P: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr,
                   PAGE_IDS: tl.constexpr):
    """The split's page ids as one vector, loaded before the page loop (PAGE_IDS; else a placeholder). A page id loaded
    inside the loop feeds the addresses of the same step's loads, and Triton's pipeline then allots the code
    buffers a single stage: each step waited for its own page (`async_wait num = 0`, Nsight Compute: a fifth of
    kivi:4's stall samples on that wait). With the ids loaded ahead the loads' addresses hang on no load in the loop."""
    ids = first
    if PAGE_IDS:
        indices = first + tl.arange(0, PAGES_PER_SPLIT)
        ids = tl.load(table_ptr + row * width + indices, mask=indices * P < length, other=0)
    return ids


@triton.jit
def split_item(values, i):
    """Item i of a vector of the split's per-page values (page ids, page scales) held in registers: no load."""
    return tl.sum(tl.where(tl.arange(0, values.shape[0]) == i, values, 0))


@triton.jit
def softmax_update(s, m_i, l_i, BASE2: tl.constexpr = False, KEYS_AXIS: tl.constexpr = 1):
    """One tile of scaled scores [queries, keys] (-inf where hidden) into the running softmax: returns p, the
    rescale factor alpha, and the new m, l. BASE2: the scores are already times log2(e) and exponentiate in base
    2 (one multiply less per score; m is then in base 2 too). KEYS_AXIS 0: the tile is [keys, queries] (the packed
    kernels that hold the queries as columns)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=KEYS_AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if KEYS_AXIS == 1:
        shifted = s - m_safe[:, None]
    else:
        shifted = s - m_safe[None, :]
    if BASE2:
        p = tl.math.exp2(shifted)
        alpha = tl.math.exp2(m_i - m_safe)
    else:
        p = tl.exp(shifted)
        alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=KEYS_AXIS)


@triton.jit
def softmax_step(s, visible, m_i, l_i, scale):
    """`softmax_update` of raw scores, scaled, hidden where `visible` (a mask broadcastable to them) is false."""
    return softmax_update(tl.where(visible, s * scale, float("-inf")), m_i, l_i)


@triton.jit
def window_mask(valid, pos_ptr, page, qpos_ptr, window, P: tl.constexpr, WINDOWED: tl.constexpr, start=0):
    """WINDOWED: `valid` [n] (the page's slots from `start`) and within the sliding window of the query."""
    if WINDOWED:
        pos = tl.load(pos_ptr + page * P + start + tl.arange(0, valid.shape[0]))
        valid = valid & (pos > tl.load(qpos_ptr) - window)
    return valid


@triton.jit
def store_stats(m_ptr, l_ptr, row, split, splits, m_i, l_i, G: tl.constexpr, BLOCK_G: tl.constexpr):
    offs_g = tl.arange(0, BLOCK_G)
    out = (row * splits + split) * G + offs_g
    tl.store(m_ptr + out, m_i, mask=offs_g < G)
    tl.store(l_ptr + out, l_i, mask=offs_g < G)
    return out


@triton.jit
def _splits_max(m_ptr, row, g, lo, splits, top, G: tl.constexpr, BLOCK_S: tl.constexpr):
    offs_s = lo + tl.arange(0, BLOCK_S)
    m = tl.load(m_ptr + (row * splits + offs_s) * G + g, mask=offs_s < splits, other=float("-inf"))
    return tl.maximum(top, m)


@triton.jit
def _splits_sum(m_ptr, l_ptr, acc_ptr, row, g, lo, splits, m_max, denom, out, G: tl.constexpr, D: tl.constexpr,
                BLOCK_S: tl.constexpr):
    offs_s = lo + tl.arange(0, BLOCK_S)
    split = row * splits + offs_s
    inside = offs_s < splits
    weight = tl.exp(tl.load(m_ptr + split * G + g, mask=inside, other=float("-inf")) - m_max)
    denom += weight * tl.load(l_ptr + split * G + g, mask=inside, other=0.0)
    acc = tl.load(acc_ptr + (split * G + g)[:, None] * D + tl.arange(0, D)[None, :], mask=inside[:, None], other=0.0)
    return denom, out + tl.sum(acc * weight[:, None], axis=0)


@triton.jit
def combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, splits, G: tl.constexpr, D: tl.constexpr,
                   BLOCK_S: tl.constexpr, INTERPRETED_END: tl.constexpr):
    """One (row, query) of `decode.combine`: merge `splits` partial softmaxes (running max m, sum l, unnormalised
    output acc) into the output, stored in out's dtype. Rows that saw no key (every m is -inf) get zeros.
    INTERPRETED_END: `splits` as a constant (Triton's interpreter loops only to constants)."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    top = tl.full([BLOCK_S], float("-inf"), tl.float32)
    if INTERPRETED_END:
        for lo in range(0, INTERPRETED_END, BLOCK_S):
            top = _splits_max(m_ptr, row, g, lo, splits, top, G, BLOCK_S)
    else:
        for lo in range(0, splits, BLOCK_S):
            top = _splits_max(m_ptr, row, g, lo, splits, top, G, BLOCK_S)
    m_max = tl.max(top, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    denom = tl.zeros([BLOCK_S], tl.float32)
    out = tl.zeros([D], tl.float32)
    if INTERPRETED_END:
        for lo in range(0, INTERPRETED_END, BLOCK_S):
            denom, out = _splits_sum(m_ptr, l_ptr, acc_ptr, row, g, lo, splits, m_max, denom, out, G, D, BLOCK_S)
    else:
        for lo in range(0, splits, BLOCK_S):
            denom, out = _splits_sum(m_ptr, l_ptr, acc_ptr, row, g, lo, splits, m_max, denom, out, G, D, BLOCK_S)
    total = tl.maximum(tl.sum(denom, axis=0), 1.1754943508222875e-38)  # float32's smallest normal
    tl.store(out_ptr + (row * G + g) * D + tl.arange(0, D), out / total)


@triton.jit
def write_token_kernel(table_ptr, len_ptr, width, k_ptr, v_ptr, pos_ptr, k_src, v_src, src_stride, pos_src,
                       pos_stride, P: tl.constexpr, D: tl.constexpr):  # pos_stride 0: one position for every row
    """One decode token per row into its pages: slot `lengths[row]` of the row's page table (pages reserved
    beforehand), keys, values and position, then the row's length + 1. In place: no allocation, no host sync."""
    row = tl.program_id(0)
    length = tl.load(len_ptr + row)
    page = tl.load(table_ptr + row * width + length // P).to(tl.int64)
    slot = page * P + length % P
    offs_d = tl.arange(0, D)
    tl.store(k_ptr + slot * D + offs_d, tl.load(k_src + row * src_stride + offs_d))
    tl.store(v_ptr + slot * D + offs_d, tl.load(v_src + row * src_stride + offs_d))
    tl.store(pos_ptr + slot, tl.load(pos_src + row * pos_stride))
    tl.store(len_ptr + row, length + 1)
