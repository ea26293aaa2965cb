"""The low-bit estimate of a causal prefill's block attention (`pattern.lowbit_block_mass`) in Triton.

A tile is one KV head's `PAIRS` consecutive (query block, query head) pairs of its GQA group (default: 64 rows, 16
pairs at 4 sampled rows), the longest first; a program does one (or, PERSISTENT, takes tiles from a counter until
none is left). The pairs' sampled rows form one tile, so every key block is loaded once for all of them, and no
row is padding (GQA 3 in tiles of whole query blocks padded the heads to 4: a quarter of the exponentials were for
nothing).
Exact dot products of the codes: Hopper has no int4 MMA, so 4-bit codes go to the tensor cores as float8 e4m3
(exact: see `ESTIMATE_LAUNCH`'s FLOAT8), 8-bit ones as int8. The anchors come first (the sink block, then each
row's own block): their maximum shifts the row's exponents. One pass over the visible key blocks (those before the
tile's first query block unmasked, then the diagonal ones) writes each row's weight per key block to a scratch
(float32, one 256-byte line per key block, a program's own) and sums the row's total; a last loop over the scratch
(just written: mostly from L2, 16 key blocks a step) turns the weights into shares of their row's total and sums
them over each (query block, head)'s rows into the mass. The scratch is bounded (`SCRATCH_BYTES`: fewer programs a
launch beyond it); nothing of size tokens × tokens is written. `pick_blocks_triton` then picks each query block's
key blocks from the mass.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .pattern import check_lowbit_settings, key_means
from .prefill import LOG2E

# PAIRS 0: as many (query block, head) pairs a program as make a 64-row tile (16 rows a warp: wgmma). Tiles of whole
# query blocks with the heads padded to a power of two (GQA 3 -> 4), two blocks a tile at 8 rows, took 8.2 ms at 128k
# on an H200 (9 / 3 heads, head_dim 64; benchmarks/results/sparse_prefill_h200_captured_int4_*.md), against 9.9 for
# one block a program at 2 warps and 8.6 for four at 4 or 8 warps.
ESTIMATE_LAUNCH = {"num_warps": 4, "num_stages": 3, "PAIRS": 0, "FLOAT8": 1, "PERSISTENT": None, "PREFETCH": 1,
                   "SLOTS": 0}
# FLOAT8: 4-bit codes as float8 e4m3 (every code exact; a row's sum of products is an integer below 128 * 49 < 2^13,
# well inside the ~14 bits Hopper's float8 accumulation keeps), so the dot product is a float8 wgmma at int8's rate
# and the scores need no int -> float conversion, a quarter-rate instruction per score like the exponential. With
# the blocks before the diagonal read unmasked (no compare and select; scale and shift fused), the key loop's sm_90
# SASS at head_dim 64, GQA 3 (the shapes timed at 128k) went from 455 instructions (32 of them I2F) to 293, and
# with reduce=max from 366 to 203 (`benchmarks/inspect_kernel.py --estimate`, offline).
# Without PERSISTENT (0, or None with SLOTS set) a program does one tile, in launches of SLOTS tiles of every KV
# head (0: all at once) under SCRATCH_BYTES: at 128k, 9 / 3 heads, three launches, the last with one long program a
# multiprocessor. PERSISTENT: one launch of SLOTS programs (0: SLOTS_PER_SM a multiprocessor, more than can be
# resident; those not resident find no tile left) taking tiles longest first from a counter, each reusing its
# scratch. PREFETCH: the next block's key scales loaded a block ahead (read right after the dot, their load stalled
# every step: Nsight Compute, H200). Both on, H200, the captured layer tiled (`estimate_kernel_h200_captured.md`):
# 4.11 -> 2.40 ms at 128k (the whole sparse prefill 2.57x -> 2.87x SDPA), 1.00 -> 1.11 at 64k (0.88 with SLOTS 264
# or 396); the loop over tiles took the registers from 88 to 152, and capped (maxnreg 128, 96) it was slower. On an
# H100 (`estimate_kernel_h100_captured.md`, every mode's masses equal): one tile a program 1.01 / 3.15 ms at 64k /
# 128k, PREFETCH 0.92 / 2.72, both 1.09 / 2.31. Hence the default: PREFETCH on, and PERSISTENT None, persistent where
# one tile a program would take several launches (at 128k, not at 64k, for these heads). The compiled tests'
# failures that had kept both off (masses off by up to 2.5% in every mode, and the codes test) were the reference's:
# torch on CUDA divides by a Python number as a multiply by its reciprocal, an ulp off, which moved a few codes
# (`reference.int8_blocks` now divides by a tensor; the codes kernel by `tl.div_rn`); since the fix they pass
# compiled in every mode (H100, 2026-12-06). Not pursued: exponentials two to an instruction (`ex2.approx.f16x2` / `.bf16x2` of each
# block's scores less the block's own maximum; in a one-off CPU emulation, not kept, float16 that way gave float32's
# density and recall on the captured layer at 32k) compile to two MUFU.EX2.F16 / .BF16 each on sm_90 (ptxas): no
# fewer than float32.
SCRATCH_BYTES = 256 << 20
SLOTS_PER_SM = 8
SHARES_STEP = tl.constexpr(16)  # key blocks a step of the loop that turns the scratch into shares


@triton.jit
def _key_scores(q, positions, kc_ptr, ks_ptr, kv, tokens, j, D: tl.constexpr, BLOCK: tl.constexpr,
                MASKED: tl.constexpr, key_scale=None):
    """The tile's rows against key block j before the rows' own scales (q_codes · k_codes × the key's scale). MASKED:
    keys after a row's position or past the end are -inf (only the diagonal blocks need it: every row sees the
    blocks before them whole, and those scores go straight into one multiply-add and an exponential). `key_scale`:
    the block's key scales, loaded ahead by the caller (else loaded here)."""
    keys = j * BLOCK + tl.arange(0, BLOCK)
    at = kc_ptr + (kv * tokens + keys[:, None]) * D + tl.arange(0, D)[None, :]
    if MASKED:
        codes = tl.load(at, mask=(keys < tokens)[:, None], other=0.0)
        key_scale = tl.load(ks_ptr + kv * tokens + keys, mask=keys < tokens, other=0.0)
    else:
        codes = tl.load(at)
        if key_scale is None:
            key_scale = tl.load(ks_ptr + kv * tokens + keys)
    scores = tl.dot(q, tl.trans(codes)).to(tl.float32) * key_scale[None, :]
    if MASKED:
        scores = tl.where(keys[None, :] <= positions[:, None], scores, float("-inf"))
    return scores


@triton.jit
def _anchor_max(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, anchor, m_i, D: tl.constexpr,
                BLOCK: tl.constexpr):
    """Key block j into the maximum score (log2 units) of the rows it anchors (`anchor` [rows])."""
    scores = _key_scores(q, positions, kc_ptr, ks_ptr, kv, tokens, j, D, BLOCK, True) * q_scale[:, None]
    return tl.maximum(m_i, tl.max(tl.where(anchor[:, None], scores, float("-inf")), axis=1))


@triton.jit
def _weigh_block(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, rows_at, total, TILE: tl.constexpr,
                 D: tl.constexpr, BLOCK: tl.constexpr, MAX: tl.constexpr, MASKED: tl.constexpr, key_scale=None):
    """Each row's weight in key block j relative to its anchors' maximum, into the scratch; the rows' running
    totals. The weight: its keys' exp(s) summed (MAX: the largest, one exponential a row; the rows' scales are
    positive, so they apply after the maximum), exponents capped at 64 above the anchors' maximum (no overflow)."""
    scores = _key_scores(q, positions, kc_ptr, ks_ptr, kv, tokens, j, D, BLOCK, MASKED, key_scale)
    if MAX:
        weights = tl.exp2(tl.minimum(tl.max(scores, axis=1) * q_scale - m_i, 64.0))
    else:
        weights = tl.sum(tl.exp2(tl.minimum(scores * q_scale[:, None] - m_i[:, None], 64.0)), axis=1)
    tl.store(rows_at + j * TILE, weights)
    return total + weights


@triton.jit
def _store_shares(rows_at, inverse, out, stored, first, end, TILE: tl.constexpr, PAIRS: tl.constexpr,
                  ROWS: tl.constexpr, STEP: tl.constexpr):
    """Key blocks [first, first + STEP) below `end`: their share of each row's total (`inverse`: 1 / the total),
    summed over each (query block, head)'s rows, at out + key block."""
    at = first + tl.arange(0, STEP)
    inside = at < end
    shares = tl.load(rows_at[None, :] + at[:, None] * TILE, mask=inside[:, None], other=0.0) * inverse[None, :]
    summed = tl.sum(tl.reshape(shares, [STEP, PAIRS, ROWS]), axis=2)
    tl.store(out[None, :] + at[:, None], summed, mask=inside[:, None] & stored[None, :])


@triton.jit
def _estimate_tile(qc_ptr, qs_ptr, kc_ptr, ks_ptr, mass_ptr, rows_at, kv, start, tokens, blocks, scale_log2,
                   GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                   INTERPRETED_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, SPAN: tl.constexpr, MAX: tl.constexpr,
                   PREFETCH: tl.constexpr):
    """KV head kv's (query block, head) pairs [start, start + PAIRS) (pair p: query block p // GROUP's head
    p % GROUP, as the codes are stored): their masses, through the scratch at rows_at (+ j * TILE: key block j's
    weights, one per tile row)."""
    TILE: tl.constexpr = PAIRS * ROWS
    tile = tl.arange(0, TILE)
    pair, row = start + tile // ROWS, tile % ROWS
    block = pair // GROUP
    real = pair < blocks * GROUP
    positions = tl.minimum(block * BLOCK + (row + 1) * (BLOCK // ROWS) - 1, tokens - 1)
    sampled = (kv * blocks * GROUP + pair) * ROWS + row  # [batch, kv_heads, blocks, group, rows]
    q = tl.load(qc_ptr + sampled[:, None] * D + tl.arange(0, D)[None, :], mask=real[:, None], other=0.0)
    q_scale = tl.load(qs_ptr + sampled, mask=real, other=1.0) * scale_log2  # > 0: a maximum's order holds
    first = start // GROUP
    end = tl.minimum((start + PAIRS - 1) // GROUP + 1, blocks)  # key blocks [0, end) are visible to some row
    m_i = tl.full([TILE], float("-inf"), tl.float32)
    # the anchors: their maximum is each row's exponent shift (finite: key 0 is always visible)
    m_i = _anchor_max(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, 0, block >= 0, m_i, D, BLOCK)
    for d in tl.static_range(SPAN):  # each row's own block (block 0's is the sink, already in)
        if (first + d > 0) & (first + d < end):
            m_i = _anchor_max(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, first + d, block == first + d, m_i,
                              D, BLOCK)
    total = tl.zeros([TILE], tl.float32)
    if INTERPRETED_BLOCKS:  # Triton's interpreter loops only to constants
        for j in range(0, INTERPRETED_BLOCKS):
            if j < first:
                total = _weigh_block(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, rows_at, total, TILE,
                                     D, BLOCK, MAX, False)
            elif j < end:
                total = _weigh_block(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, rows_at, total, TILE,
                                     D, BLOCK, MAX, True)
    else:  # the blocks before the tile's first query block, seen whole by every row; then the diagonal ones
        if PREFETCH:
            scales_at = ks_ptr + kv * tokens + tl.arange(0, BLOCK)
            key_scale = tl.load(scales_at, mask=first > 0, other=0.0)  # block 0's: whole when the loop runs
            for j in range(0, first):
                # the next block's key scales a block ahead (their load is not pipelined through shared memory,
                # and read right after the dot it stalled every step); the last step reloads its own, whole block
                ahead = tl.load(scales_at + tl.minimum(j + 1, first - 1) * BLOCK)
                total = _weigh_block(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, rows_at, total, TILE,
                                     D, BLOCK, MAX, False, key_scale)
                key_scale = ahead
        else:
            for j in range(0, first):
                total = _weigh_block(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, rows_at, total, TILE,
                                     D, BLOCK, MAX, False)
        for j in range(first, end):
            total = _weigh_block(q, q_scale, positions, kc_ptr, ks_ptr, kv, tokens, j, m_i, rows_at, total, TILE, D,
                                 BLOCK, MAX, True)
    # each row's weights as shares of its total, summed over each pair's rows into the mass; the weights are read
    # back by other threads than wrote them (the layout change of `total` below put a barrier between them, by
    # chance: this one says so)
    tl.debug_barrier()
    pairs = start + tl.arange(0, PAIRS)
    out = mass_ptr + ((kv * GROUP + pairs % GROUP) * blocks + pairs // GROUP) * blocks  # q head = kv * GROUP + head
    stored = pairs < blocks * GROUP
    inverse = 1.0 / total  # once a row (a full division per weight was 6% of the kernel's stall samples)
    for j in range(0, INTERPRETED_BLOCKS if INTERPRETED_BLOCKS else end, SHARES_STEP):
        _store_shares(rows_at, inverse, out, stored, j, end, TILE, PAIRS, ROWS, SHARES_STEP)


@triton.jit
def _lowbit_mass_kernel(qc_ptr, qs_ptr, kc_ptr, ks_ptr, mass_ptr, scratch_ptr, taken_ptr, tokens, blocks, tiles,
                        heads, first_tile, scale_log2, GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr, INTERPRETED_BLOCKS: tl.constexpr, INTERPRETED_TILES: tl.constexpr = 0,
                        PAIRS: tl.constexpr = 8, SPAN: tl.constexpr = 1, MAX: tl.constexpr = False,
                        PERSISTENT: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """Without PERSISTENT: KV head program_id(1) (batch * kv_heads + kv_head)'s tile of pairs [t * PAIRS, + PAIRS),
    t = tiles - 1 - first_tile - program_id(0) (the longest first). PERSISTENT: each program takes the next item i
    from the counter at taken_ptr until none is left, KV head i % heads's tile t = tiles - 1 - i // heads. SPAN: the
    most query blocks PAIRS pairs touch. MAX: the `reduce="max"` weights. PREFETCH: key scales a block ahead.
    scratch: each program's row weights [key blocks, tile rows] (float32) until its rows' totals are known."""
    TILE: tl.constexpr = PAIRS * ROWS
    slot = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    rows_at = scratch_ptr + slot * blocks * TILE + tl.arange(0, TILE)
    if not PERSISTENT:  # a 2-D grid: its index math kept 21 registers fewer than an item's division (sm_90)
        _estimate_tile(qc_ptr, qs_ptr, kc_ptr, ks_ptr, mass_ptr, rows_at, tl.program_id(1).to(tl.int64),
                       (tiles - 1 - first_tile - tl.program_id(0)) * PAIRS, tokens, blocks, scale_log2, GROUP, ROWS,
                       D, BLOCK, INTERPRETED_BLOCKS, PAIRS, SPAN, MAX, PREFETCH)
    elif INTERPRETED_TILES:  # the interpreter: a loop to a constant
        for _ in range(0, INTERPRETED_TILES):
            taken = tl.atomic_add(taken_ptr, 1)
            if taken < tiles * heads:
                _estimate_tile(qc_ptr, qs_ptr, kc_ptr, ks_ptr, mass_ptr, rows_at, (taken % heads).to(tl.int64),
                               (tiles - 1 - taken // heads) * PAIRS, tokens, blocks, scale_log2, GROUP, ROWS, D,
                               BLOCK, INTERPRETED_BLOCKS, PAIRS, SPAN, MAX, PREFETCH)
    else:
        taken = tl.atomic_add(taken_ptr, 1)
        while taken < tiles * heads:
            _estimate_tile(qc_ptr, qs_ptr, kc_ptr, ks_ptr, mass_ptr, rows_at, (taken % heads).to(tl.int64),
                           (tiles - 1 - taken // heads) * PAIRS, tokens, blocks, scale_log2, GROUP, ROWS, D, BLOCK,
                           INTERPRETED_BLOCKS, PAIRS, SPAN, MAX, PREFETCH)
            tl.debug_barrier()  # every thread done reading the scratch before the next tile writes it
            taken = tl.atomic_add(taken_ptr, 1)


@triton.jit
def _codes_kernel(x_ptr, mean_ptr, codes_ptr, scales_ptr, stride_b, stride_h, stride_t, heads, tokens, count,
                  TOP: tl.constexpr, D: tl.constexpr, TOKENS: tl.constexpr, SMOOTH: tl.constexpr,
                  BLOCK: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Rows [program_id(0) * TOKENS, + TOKENS) of the `count` of head program_id(1) (batch * heads + head): per row
    codes round(x' / s) in [-TOP, TOP] (to even, as torch.round) and s = max |x'| / TOP, x' = x (- the head's mean
    if SMOOTH). ROWS > 0: row i is sampled query i % ROWS of query block i // ROWS (`pattern.sampled_rows`), stored
    as the estimate reads its tile: [batch, kv_heads, blocks, GROUP, ROWS]."""
    i = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    flat = tl.program_id(1).to(tl.int64)
    if ROWS:
        token = tl.minimum((i // ROWS) * BLOCK + (i % ROWS + 1) * (BLOCK // ROWS) - 1, tokens - 1)
        out = ((flat // GROUP) * (count // ROWS) + i // ROWS) * (GROUP * ROWS) + (flat % GROUP) * ROWS + i % ROWS
    else:
        token = i
        out = flat * count + i
    live = i < count
    d = tl.arange(0, D)
    x = tl.load(x_ptr + (flat // heads) * stride_b + (flat % heads) * stride_h + token[:, None].to(tl.int64) * stride_t
                + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
    if SMOOTH:
        x = x - tl.load(mean_ptr + flat * D + d)[None, :]
    # divisions rounded as IEEE (and torch) round them: Triton's `/` is the approximate div.full.f32 (2 ulp), which
    # moved codes at rounding boundaries and scales by an ulp (compiled tests, H100)
    step = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8), TOP + 0.0)
    scaled = tl.div_rn(x, step[:, None])
    codes = tl.minimum(tl.maximum((scaled + 12582912.0) - 12582912.0, -TOP), TOP)  # + 1.5 * 2^23: round to even
    tl.store(codes_ptr + out[:, None] * D + d[None, :], codes.to(codes_ptr.dtype.element_ty), mask=live[:, None])
    tl.store(scales_ptr + out, step, mask=live)


def _codes(x: torch.Tensor, count: int, bits: int, dtype: torch.dtype, smooth: bool, block: int = 0, rows: int = 0,
           group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One `_codes_kernel` pass over x [batch, heads, tokens, dim]: codes [batch * heads * count, dim] and scales."""
    batch, heads, tokens, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty(batch * heads * count, dim, device=x.device, dtype=dtype)
    scales = torch.empty(batch * heads * count, device=x.device)
    mean = key_means(x).contiguous() if smooth else scales
    per_program = max(16, 8192 // dim)
    _codes_kernel[(triton.cdiv(count, per_program), batch * heads)](
        x, mean, codes, scales, x.stride(0), x.stride(1), x.stride(2), heads, tokens, count, TOP=2 ** (bits - 1) - 1,
        D=dim, TOKENS=per_program, SMOOTH=smooth, BLOCK=block, ROWS=rows, GROUP=group)
    return codes, scales


def lowbit_codes_triton(query: torch.Tensor, key: torch.Tensor, block: int, bits: int, rows: int,
                        float8: bool = False) -> tuple[torch.Tensor, ...]:
    """`pattern.lowbit_operands`' codes in one Triton pass over the sampled queries and one over the keys (after
    their mean): the same codes and scales, the queries' already grouped as the estimate kernel reads them
    ([batch, kv_heads, blocks, group, rows, dim]), the keys' [batch, kv_heads, tokens, dim]; `float8`: the codes as
    float8 e4m3 (exact for 4 bits), else int8."""
    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    blocks = -(-tokens // block)
    dtype = torch.float8_e4m3fn if float8 else torch.int8
    q_codes, q_scales = _codes(query, blocks * rows, bits, dtype, False, block, rows, q_heads // kv_heads)
    k_codes, k_scales = _codes(key, tokens, bits, dtype, True)
    grouped = (batch, kv_heads, blocks, q_heads // kv_heads, rows)
    return (q_codes.view(*grouped, dim), q_scales.view(grouped), k_codes.view(batch, kv_heads, tokens, dim),
            k_scales.view(batch, kv_heads, tokens))


def pair_tiles(rows: int, group: int, pairs: int = 0) -> tuple[int, int]:
    """The estimate kernel's PAIRS (0: a 64-row tile) and SPAN, the most query blocks a tile of that many
    consecutive (query block, head) pairs touches (tiles start at multiples of PAIRS, so mid-block unless GROUP
    divides them)."""
    pairs = pairs or max(1, 64 // rows)
    if pairs & (pairs - 1) or pairs * rows < 16:
        raise ValueError(f"low-bit estimate kernel: PAIRS must be a power of two and PAIRS * rows >= 16 (a "
                         f"tensor-core tile), got PAIRS={pairs}, rows={rows}")
    return pairs, max(-(-(pairs + offset) // group) for offset in range(0, group, math.gcd(pairs, group)))


def lowbit_block_mass_triton(query: torch.Tensor, key: torch.Tensor, scale: float, block: int = 64, bits: int = 4,
                             rows: int = 8, reduce: str = "sum", launch: dict | None = None, upper: bool = True
                             ) -> torch.Tensor:
    """`pattern.lowbit_block_mass` in Triton: query/key [batch, heads, tokens, dim] (GQA, head_dim a power of two
    >= 32: int8 and float8 dot products reduce over >= 32), float32 [batch, q_heads, blocks, blocks] (zero above the
    diagonal; `upper=False`: left unset there, for the pick, which reads only the visible blocks: no memset of
    blocks^2 floats, 151 MB at 128k for 9 heads). `launch` overrides `ESTIMATE_LAUNCH` (num_warps, num_stages,
    PAIRS, FLOAT8, PERSISTENT, PREFETCH, SLOTS)."""
    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    blocks = -(-tokens // block)
    if q_heads % kv_heads or dim < 32 or dim & (dim - 1):
        raise ValueError(f"low-bit estimate kernel: q_heads must be a multiple of kv_heads and head_dim a power of "
                         f"two >= 32, got {q_heads}, {kv_heads}, {dim}")
    check_lowbit_settings(block, bits, rows, reduce)
    options = {**ESTIMATE_LAUNCH, **(launch or {})}
    float8 = bool(options.pop("FLOAT8")) and bits == 4  # 4-bit codes are exact in e4m3 (8-bit ones are not)
    q_codes, q_scales, k_codes, k_scales = lowbit_codes_triton(query, key, block, bits, rows, float8)
    mass = (torch.zeros if upper else torch.empty)(batch, q_heads, blocks, blocks, device=query.device)
    per_program, options["SPAN"] = pair_tiles(rows, group, options.get("PAIRS", 0))
    options["PAIRS"] = per_program
    tiles = triton.cdiv(blocks * group, per_program)
    items = tiles * batch * kv_heads  # (tile, KV head) pairs
    slot_bytes = blocks * per_program * rows * 4  # one program's scratch
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    common = dict(GROUP=group, ROWS=rows, D=dim, BLOCK=block, INTERPRETED_BLOCKS=blocks if interpreted else 0,
                  MAX=reduce == "max")
    slots = options.pop("SLOTS")
    # one tile a program: launches of `at_once` tiles of every KV head, so the scratch stays under SCRATCH_BYTES
    at_once = max(1, min(slots or tiles, tiles, SCRATCH_BYTES // (slot_bytes * batch * kv_heads)))
    persistent = options.pop("PERSISTENT")
    if persistent is None:  # the default: one persistent launch where one tile a program would take several
        persistent = at_once < tiles and not slots
    if persistent:
        slots = slots or (torch.cuda.get_device_properties(query.device).multi_processor_count * SLOTS_PER_SM
                          if query.is_cuda else 4)
        slots = max(1, min(slots, items, SCRATCH_BYTES // slot_bytes))
        scratch = torch.empty(slots * slot_bytes // 4, device=query.device)
        taken = torch.zeros(1, dtype=torch.int32, device=query.device)  # the next item's index
        _lowbit_mass_kernel[(slots, 1)](
            q_codes, q_scales, k_codes, k_scales, mass, scratch, taken, tokens, blocks, tiles, batch * kv_heads, 0,
            scale * LOG2E, INTERPRETED_TILES=triton.cdiv(items, slots) if interpreted else 0, PERSISTENT=True,
            **common, **options)
        return mass
    scratch = torch.empty(at_once * batch * kv_heads * slot_bytes // 4, device=query.device)
    for first_tile in range(0, tiles, at_once):
        _lowbit_mass_kernel[(min(at_once, tiles - first_tile), batch * kv_heads)](
            q_codes, q_scales, k_codes, k_scales, mass, scratch, None, tokens, blocks, tiles, batch * kv_heads,
            first_tile, scale * LOG2E, **common, **options)
    return mass


@triton.jit
def _pick_kernel(mass_ptr, mask_ptr, picks_ptr, counts_ptr, blocks, gamma, BLOCKS_PAD: tl.constexpr,
                 LISTS: tl.constexpr, ARITY: tl.constexpr = 2):
    """Query block program_id(0) of head program_id(1): its visible key blocks' masses, the largest threshold t with
    the masses >= t still holding gamma of the row (a search on the float bits: non-negative floats order as their
    bits), and the mask: the masses >= t, and the diagonal. LISTS: also the kept blocks below the diagonal in
    ascending order and their count, as `sparse.block_lists` makes them from the mask. ARITY 4: the search tries
    three thresholds a step (one reduction of three sums: 16 steps, not 31; the same t)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCKS_PAD)
    at = (tl.program_id(1).to(tl.int64) * blocks + row) * blocks + cols
    mass = tl.load(mass_ptr + at, mask=cols <= row, other=0.0)
    bits = mass.to(tl.int32, bitcast=True)
    target = tl.sum(mass) * gamma
    low = row * 0  # every mass is >= 0 (bits 0): the whole row holds gamma of itself
    high = low + 0x7F800000  # nothing is >= inf
    if ARITY == 4:  # low holds, high does not; thresholds low + i * ceil((high - low) / 4), below high, i = 0..3
        quarters = tl.arange(0, 4)
        for _ in range(16):  # ceil(d / 4) sixteen times takes d < 2^31 to 1
            tries = tl.minimum(low + quarters * ((high - low + 3) // 4), high - 1)
            held = tl.sum(tl.where(bits[:, None] >= tries[None, :], mass[:, None], 0.0), axis=0) >= target
            highest = tl.max(tl.where(held, quarters, 0), axis=0)  # the largest that holds (smaller ones do too)
            high = tl.where(highest == 3, high, tl.sum(tl.where(quarters == highest + 1, tries, 0), axis=0))
            low = tl.sum(tl.where(quarters == highest, tries, 0), axis=0)
    else:
        for _ in range(31):
            middle = low + (high - low) // 2
            holds = tl.sum(tl.where(bits >= middle, mass, 0.0)) >= target
            low, high = tl.where(holds, middle, low), tl.where(holds, high, middle)
    keep = (((bits >= low) | (gamma >= 1)) & (mass > 0)) | (cols == row)  # gamma 1: whatever the sums' rounding
    tl.store(mask_ptr + at, keep.to(tl.int8), mask=cols < blocks)
    if LISTS:
        below = keep & (cols < row)
        slots = tl.cumsum(below.to(tl.int32), axis=0) - 1
        tl.store(picks_ptr + at - cols + slots, cols, mask=below)
        tl.store(counts_ptr + tl.program_id(1).to(tl.int64) * blocks + row, tl.sum(below.to(tl.int32)))


def pick_blocks_triton(mass: torch.Tensor, gamma: float, lists: bool = False, launch: dict | None = None):
    """`pattern.pick_blocks` in Triton, one program per query block: masses [..., blocks, blocks] (float32, >= 0)
    -> the causal block mask. The fewest largest visible blocks whose sum reaches gamma of the row, and the diagonal
    (blocks tied with the last one kept are kept too: the reference keeps the first of them in its sort order).
    `lists`: (mask, `sparse.block_lists(mask)`) from the same pass, so the sparse kernel needs no scan of the mask
    (a row's list is set up to its count, not zero-filled past it).
    `launch`: num_warps, ARITY (2: bisection, 31 steps; 4: three thresholds a step, 16: half the barriers, a step's
    sm_90 instructions 55 -> 210 and registers 62 -> 125 at 2048 blocks; H100, 128k: 0.44 -> 0.98 ms, not kept)."""
    blocks = mass.shape[-1]
    rows = mass.reshape(-1, blocks, blocks).contiguous().float()
    mask = torch.empty(rows.shape, dtype=torch.bool, device=mass.device)
    picks = torch.empty(rows.shape if lists else (1,), dtype=torch.int32, device=mass.device)
    counts = torch.empty(rows.shape[:2] if lists else (1,), dtype=torch.int32, device=mass.device)
    pad = triton.next_power_of_2(blocks)
    options = {"num_warps": min(16, max(1, pad // 256)), "ARITY": 2, **(launch or {})}
    _pick_kernel[(blocks, rows.shape[0])](rows, mask.view(torch.int8), picks, counts, blocks, gamma, BLOCKS_PAD=pad,
                                           LISTS=lists, **options)
    mask = mask.view(mass.shape)
    if not lists:
        return mask
    diagonal = torch.ones(mass.shape[:-1], dtype=torch.int8, device=mass.device)  # always kept
    return mask, (picks.view(mass.shape), counts.view(mass.shape[:-1]), diagonal)
