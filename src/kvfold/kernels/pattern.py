"""FlexPrefill's pattern choice (Lai et al. 2025, arXiv:2502.20766), in PyTorch: which key blocks each query block
of a causal prefill reads, per head. `kernels.sparse` computes attention over the chosen blocks in Triton and
`reference.block_sparse_attention` defines it; this module needs no Triton.

`flexprefill_mask(query, key, scale, gamma, tau, block)`:
1. The last query block's exact attention â over every key (one block of queries: cheap; each KV head's keys
   are multiplied with its group's queries in place, and the pooled blocks are summed in float32 without a
   float32 copy of Q or K).
2. Its block distribution is compared with an estimate from pooled queries and keys. If their Jensen–Shannon
   distance is below `tau`, the pooled estimate is trusted for every query block: query-aware. Else the head
   uses a vertical-slash pattern read from â: key columns (vertical) and query-key offsets (slash).
3. Query-aware heads: each query block keeps the fewest key blocks, by pooled score, whose estimated attention
   sums to `gamma`. Vertical-slash heads: the fewest columns and the fewest offsets whose mass sums to `gamma`,
   turned into the blocks they cross. Every query block also keeps its diagonal block.
The mask approximates full attention; its recall of the attention mass is measured, not assumed
(`tests/kernels/test_sparse.py`, `benchmarks/sparse_prefill.py`, `benchmarks/sparse_density.py`).

`lowbit_mask(query, key, scale, gamma, block, bits, rows)`: the low-bit estimate (SALE, Ji et al. 2025,
arXiv:2505.24179: the pattern from 4-bit query-key products, token by token, not from pooled blocks). Per query
block, `rows` of its queries (evenly spaced) are scored against every visible key with Q and smoothed K rounded to
`bits`-bit integers per token. A key block's weight for a row is its share of the row's attention: Σ_block exp(s) /
Σ_keys exp(s). As in SALE the row's anchors, the sink block (the first) and its own block, are read first: their
largest score shifts the exponents, so one pass over the keys writes each block's exp-sum and the row's total, and
the shares follow from them (the kernel keeps the sums in a scratch, not the scores). SALE weighs a block relative
to the anchors alone; on the embedded model's layer tiled to 32k that let rows whose anchors hold little of their
attention outweigh the others (recall 0.902 against 0.943 at gamma 0.95, `sparse_density_cpu_tiled32k*.md`). Summed
over the sampled rows it is the query block's estimate; each query block keeps the fewest key blocks holding
`gamma` of it (and its diagonal block). SALE thresholds the relative score with per-head calibrated thresholds;
gamma keeps FlexPrefill's meaning here, and the row sample is this library's: 8 of 64 rows cost an eighth of
SALE's estimate and, on the embedded model at 8k, selected as well as 16 rows or 16-bit scores (8 of its layers,
offline), and close to the oracle on all 30 (`benchmarks/sparse_density.py`). `reduce="max"`: a key block's
weight is its largest exp(s), as a share of the row's sum of them (one exponential per row and block, not per key;
a block's spread-out mass counts less, so a given recall takes a somewhat larger gamma). `kernels.estimate`
computes `lowbit_block_mass` and `pick_blocks` in Triton.
"""

from __future__ import annotations

import math

import torch

from .reference import int8_blocks


def _cumulative_pick(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """[..., n] non-negative scores -> bool [..., n]: the fewest largest entries whose share reaches `gamma`
    (gamma >= 1: every positive entry, whatever the rounding of the shares' running sum)."""
    share = scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
    ordered, order = share.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the larger entries: keep while it is still below gamma
    picked = torch.zeros_like(share, dtype=torch.bool)
    return picked.scatter(-1, order, ((before < gamma) | (gamma >= 1)) & (ordered > 0))


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    mean = (p + q) / 2
    kl = lambda a: (a * (a.clamp_min(1e-30).log() - mean.clamp_min(1e-30).log())).sum(-1)  # noqa: E731
    return ((kl(p) + kl(q)) / 2).clamp_min(0).sqrt()


def _block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., tokens, dim] -> float32 sums over each block of `block` tokens [..., blocks, dim] (the last block may be
    short), accumulated in float32 without a float32 copy of x."""
    tokens, whole = x.shape[-2], x.shape[-2] // block
    sums = x[..., :whole * block, :].unflatten(-2, (whole, block)).sum(-2, dtype=torch.float32)
    if whole * block < tokens:
        sums = torch.cat([sums, x[..., whole * block:, :].sum(-2, keepdim=True, dtype=torch.float32)], dim=-2)
    return sums


def flexprefill_mask(query: torch.Tensor, key: torch.Tensor, scale: float, gamma: float = 0.9, tau: float = 0.1,
                     block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mask [batch, q_heads, blocks, blocks] (bool) for a causal prefill of query/key [batch, heads, tokens,
    dim] (GQA), and which heads went query-aware [batch, q_heads]; see the module doc."""
    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    blocks = -(-tokens // block)
    block_of = torch.arange(tokens, device=query.device) // block
    last = query[:, :, (blocks - 1) * block:].float()  # the last query block, [.., n, dim]
    last_pos = torch.arange((blocks - 1) * block, tokens, device=query.device)
    causal = torch.arange(tokens, device=query.device)[None, :] <= last_pos[:, None]
    # each KV head's keys against its group's queries at once (no copy of the keys per query head)
    grouped = last.reshape(batch, kv_heads, group * last.shape[2], dim) @ key.float().transpose(-1, -2)
    a_hat = torch.softmax((grouped.view(batch, q_heads, -1, tokens) * scale).masked_fill(~causal, float("-inf")), -1)
    true_blocks = torch.zeros(batch, q_heads, blocks, device=query.device).index_add_(
        2, block_of, a_hat.mean(dim=2))
    counts = torch.bincount(block_of, minlength=blocks).clamp_min(1).float()
    pooled_keys = (_block_sums(key, block) / counts[:, None]).repeat_interleave(group, 1)  # [.., blocks, dim]
    pooled_queries = _block_sums(query, block) / counts[:, None]
    estimate_last = torch.softmax((pooled_queries[:, :, -1:] @ pooled_keys.transpose(-1, -2)).squeeze(2) * scale, -1)
    query_aware = _js_distance(true_blocks, estimate_last) < tau
    # query-aware: pooled scores for every query block, causal over blocks
    block_causal = torch.ones(blocks, blocks, dtype=torch.bool, device=query.device).tril()
    pooled = torch.softmax(((pooled_queries @ pooled_keys.transpose(-1, -2)) * scale).masked_fill(
        ~block_causal, float("-inf")), dim=-1)
    aware_mask = pick_blocks(pooled, gamma)
    # vertical-slash from the last block's attention: columns, and offsets (query position - key position)
    vertical = _cumulative_pick(a_hat.sum(dim=2), gamma)  # [.., tokens]
    offsets = (last_pos[:, None] - torch.arange(tokens, device=query.device)[None, :]).clamp_min(0)
    slash_mass = torch.zeros(batch, q_heads, tokens, device=query.device).index_add_(
        2, offsets.flatten(), a_hat.flatten(2))
    slash = _cumulative_pick(slash_mass, gamma).float()  # [.., offsets]
    vertical_blocks = torch.zeros(batch, q_heads, blocks, device=query.device).index_add_(
        2, block_of, vertical.float()) > 0
    # an offset o reaches the block diagonals o // block and (o + block - 1) // block
    offset_ids = torch.arange(tokens, device=query.device)
    diagonal = torch.zeros(batch, q_heads, blocks, device=query.device).index_add_(2, offset_ids // block, slash)
    diagonal = diagonal.index_add_(2, ((offset_ids + block - 1) // block).clamp_max(blocks - 1), slash) > 0
    distance = torch.arange(blocks, device=query.device)[:, None] - torch.arange(blocks, device=query.device)[None, :]
    slash_mask = diagonal[..., distance.clamp_min(0)] & (distance >= 0)
    vs_mask = (vertical_blocks[..., None, :] & block_causal) | slash_mask
    mask = torch.where(query_aware[..., None, None], aware_mask, vs_mask)
    return mask | torch.eye(blocks, dtype=torch.bool, device=query.device), query_aware


def sampled_rows(tokens: int, block: int, rows: int) -> torch.Tensor:
    """The `rows` query positions of each query block the low-bit estimate scores: the last of each of `rows`
    equal parts of the block (a short last block repeats its last token). int64 [blocks * rows]."""
    blocks = -(-tokens // block)
    stride = block // rows
    positions = torch.arange(blocks)[:, None] * block + (torch.arange(rows)[None, :] + 1) * stride - 1
    return positions.flatten().clamp_max(tokens - 1)


def check_lowbit_settings(block: int, bits: int, rows: int, reduce: str) -> None:
    """The low-bit estimate's settings, or a ValueError naming the allowed ones."""
    if bits not in (4, 8) or rows < 1 or rows & (rows - 1) or block % rows:
        raise ValueError(f"low-bit estimate: bits must be 4 or 8 and rows a power of two dividing the block "
                         f"({block}), got bits={bits}, rows={rows}")
    if reduce not in ("sum", "max"):
        raise ValueError(f"low-bit estimate: reduce must be sum or max, got {reduce!r}")


def key_means(key: torch.Tensor) -> torch.Tensor:
    """Each KV head's mean key [..., 1, dim] in float32, summed without a float32 copy of K (the smoothing of
    `reference.smooth_keys`; the kernel path reads the same tensor, so both round the same codes)."""
    return key.mean(dim=-2, keepdim=True, dtype=torch.float32)


def lowbit_operands(query: torch.Tensor, key: torch.Tensor, block: int, bits: int, rows: int, reduce: str = "sum"):
    """What the low-bit estimate reads, once its settings are checked: the sampled queries' codes and scales
    [batch, q_heads, blocks * rows, ...] and the smoothed keys' (`bits`-bit codes per token,
    `reference.int8_blocks`), and the sampled positions."""
    check_lowbit_settings(block, bits, rows, reduce)
    positions = sampled_rows(query.shape[2], block, rows).to(query.device)
    q_codes, q_scales = int8_blocks(query[:, :, positions], 1, bits)
    k_codes, k_scales = int8_blocks(key.float() - key_means(key), 1, bits)
    return q_codes, q_scales, k_codes, k_scales, positions


def lowbit_block_mass(query: torch.Tensor, key: torch.Tensor, scale: float, block: int = 64, bits: int = 4,
                      rows: int = 8, reduce: str = "sum", chunk: int = 1 << 24) -> torch.Tensor:
    """The low-bit estimate of each query block's attention per key block (see the module doc), float32 [batch,
    q_heads, blocks, blocks]: row b sums the shares of query block b's sampled rows, so it adds up to `rows`;
    `reduce="max"`: per row each block's largest exp(s) as a share of their sum. Exponents are shifted by the
    anchors' (sink and own block) largest score and capped at 64 bits above it (a block that far above them is
    picked whatever its value). In float32 over the dequantized codes, a chunk of sampled rows at a time (scores
    [.., rows, tokens] near `chunk` elements)."""
    batch, q_heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    blocks = -(-tokens // block)
    q_codes, q_scales, k_codes, k_scales, positions = lowbit_operands(query, key, block, bits, rows, reduce)
    queries = q_codes.float() * q_scales[..., None]
    keys_t = (k_codes.float() * k_scales[..., None]).transpose(-1, -2)  # [batch, kv_heads, dim, tokens]
    key_positions = torch.arange(tokens, device=query.device)
    key_block = key_positions // block
    mass = torch.zeros(batch, q_heads, blocks, blocks, device=query.device)
    step = max(1, chunk // (batch * q_heads * tokens))
    for first in range(0, len(positions), step):
        picked = slice(first, min(first + step, len(positions)))
        grouped = queries[:, :, picked].reshape(batch, kv_heads, -1, dim) @ keys_t  # each KV head with its group
        scores = (grouped.view(batch, q_heads, -1, tokens) * scale).masked_fill(
            key_positions[None, :] > positions[picked, None], float("-inf"))
        anchors = (key_block[None, :] == 0) | (key_block[None, :] == positions[picked, None] // block)
        top = scores.masked_fill(~anchors, float("-inf")).amax(-1, keepdim=True)
        if reduce == "max":  # each block's largest score, then one exponential
            largest = torch.full((batch, q_heads, scores.shape[2], blocks), float("-inf"), device=query.device)
            largest = largest.scatter_reduce(3, key_block.expand_as(scores), scores, "amax")
            per_block = torch.exp((largest - top).clamp_max(64 * math.log(2)))
        else:
            weights = torch.exp((scores - top).clamp_max(64 * math.log(2)))
            per_block = torch.zeros(batch, q_heads, weights.shape[2], blocks, device=query.device).index_add_(
                3, key_block, weights)
        mass.index_add_(2, positions[picked] // block, per_block / per_block.sum(-1, keepdim=True))
    return mass


def pick_blocks(mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """Block masses [..., blocks, blocks] -> causal block mask: per query block the fewest key blocks holding
    `gamma` of its mass, and its diagonal block."""
    blocks = mass.shape[-1]
    causal = torch.ones(blocks, blocks, dtype=torch.bool, device=mass.device).tril()
    diagonal = torch.eye(blocks, dtype=torch.bool, device=mass.device)
    return (_cumulative_pick(mass.masked_fill(~causal, 0.0), gamma) & causal) | diagonal


def lowbit_mask(query: torch.Tensor, key: torch.Tensor, scale: float, gamma: float = 0.95, block: int = 64,
                bits: int = 4, rows: int = 8, kernel: bool = False, reduce: str = "sum", lists: bool = False):
    """Block mask [batch, q_heads, blocks, blocks] for a causal prefill of query/key [batch, heads, tokens, dim]
    (GQA) from the low-bit estimate (see the module doc); `kernel`: its masses and pick by `kernels.estimate`
    (Triton); `lists` (with `kernel`): (mask, the block lists `sparse.sparse_prefill` walks) from the pick."""
    if kernel:
        from .estimate import lowbit_block_mass_triton, pick_blocks_triton

        mass = lowbit_block_mass_triton(query, key, scale, block, bits, rows, reduce, upper=False)
        return pick_blocks_triton(mass, gamma, lists)
    if lists:
        raise ValueError("lowbit_mask: lists come from the pick kernel (kernel=True)")
    return pick_blocks(lowbit_block_mass(query, key, scale, block, bits, rows, reduce), gamma)
