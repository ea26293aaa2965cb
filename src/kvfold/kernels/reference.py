"""PyTorch definitions of what kvfold's kernels compute. They run anywhere (CPU included) and are the
ground truth that every Triton kernel is tested against.

- `quantize` / `dequantize`: asymmetric min-max integer quantization with packed storage (KIVI's format).
- `paged_attention`: attention of a few queries over per-(batch, KV-head) rows of paged K/V, read page chunk by
  page chunk with an online softmax (flash-decoding), so the whole context is never rebuilt in full precision.
- `int8_prefill_attention`: causal attention with Q and K in int8 per block after smoothing K (SageAttention's
  recipe), what `kernels.prefill` computes.
- `block_sparse_attention`: causal attention where each block of queries reads only the key blocks a mask selects,
  what `kernels.sparse` computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last axis, 8 // bits codes per byte (little end first)."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).unflatten(-1, (-1, per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes with the last axis 8 // bits times longer."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)


@dataclass(frozen=True)
class Quantized:
    """Packed codes with one scale and zero point per group; `x ≈ code * scale + zero`."""

    codes: torch.Tensor  # uint8, the grouped axis packed
    scale: torch.Tensor  # float16
    zero: torch.Tensor  # float16


def quantize(x: torch.Tensor, bits: int, reduce_dims: tuple[int, ...]) -> Quantized:
    """Min-max quantize `x` with statistics reduced over `reduce_dims` (the group) and codes packed on the last axis.

    Keys use KIVI's per-channel layout (reduce over the tokens of a page); values the per-token one (reduce over
    channel groups). Scales and zeros are stored in float16, as KIVI does.
    """
    xf = x.float()
    lo = xf.amin(dim=reduce_dims, keepdim=True)
    hi = xf.amax(dim=reduce_dims, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    safe_scale = scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    codes = torch.round((xf - zero.float()) / safe_scale).clamp_(0, levels)
    for dim in sorted(reduce_dims, reverse=True):
        scale, zero = scale.squeeze(dim), zero.squeeze(dim)
    return Quantized(pack(codes, bits), scale, zero)


def dequantize(q: Quantized, bits: int, expand: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """float32 values from codes; `expand` broadcasts a scale/zero tensor back to the codes' unpacked shape."""
    codes = unpack(q.codes, bits).float()
    return codes * expand(q.scale.float()) + expand(q.zero.float())


def channel_scales(x: torch.Tensor, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel smoothing of pages [pages, tokens, dim]: λ = (max over the page's tokens of |x|)^alpha, stored in
    float16, and x / λ (divided by the stored value, so `x ≈ dequantized * λ` holds exactly up to the codes).
    ZipCache's channel-separable values (alpha 0.5) and QServe's SmoothAttention keys share it."""
    scale = x.float().abs().amax(dim=-2).pow(alpha).to(SCALE_DTYPE)
    return scale, x.float() / scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny).unsqueeze(-2)


@dataclass(frozen=True)
class KVChunk:
    """A chunk of pages of every row, already decoded: K and V in float32 plus key positions and validity."""

    keys: torch.Tensor  # [rows, tokens, head_dim]
    values: torch.Tensor  # [rows, tokens, head_dim]
    positions: torch.Tensor  # [rows, tokens] int, sequence index of each key
    valid: torch.Tensor  # [rows, tokens] bool


@dataclass(frozen=True)
class LatentChunk:
    """Keys and values as latents times a basis per row (xKV's factored prompt): keys[row] = key_latents[row] @
    key_basis[row]. Attention reads it in the latent space, never rebuilding K and V: q·k = (q Bkᵀ)·latent and
    Σ p v = (Σ p latent_v) Bv, which costs a token rank-many products instead of head_dim."""

    key_latents: torch.Tensor  # [rows, tokens, key rank] (zeros past a row's end)
    key_basis: torch.Tensor  # [rows, key rank, head_dim]
    value_latents: torch.Tensor  # [rows, tokens, value rank]
    value_basis: torch.Tensor  # [rows, value rank, head_dim]
    positions: torch.Tensor  # [rows, tokens] int
    valid: torch.Tensor  # [rows, tokens] bool


def paged_attention(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    chunks: Iterable[KVChunk | LatentChunk],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of queries over K/V given as a stream of chunks, merged with an online softmax.

    query: [rows, n, head_dim] (the GQA group's query heads and query tokens flattened into n);
    query_positions: [n] or [rows, n] sequence index of each query. A key is visible to a query when it is valid,
    not later than the query, and (for sliding-window layers) less than `sliding_window` positions back.
    Returns [rows, n, head_dim] in float32; a query that sees no key gets zeros.
    """
    q = query.float()
    rows, n, dim = q.shape
    q_pos = query_positions.expand(rows, n) if query_positions.dim() == 1 else query_positions
    running_max = torch.full((rows, n), float("-inf"), device=q.device)
    denom = torch.zeros(rows, n, device=q.device)
    acc = torch.zeros(rows, n, dim, device=q.device)
    for chunk in chunks:
        latent = isinstance(chunk, LatentChunk)
        if latent:
            logits = torch.bmm(torch.bmm(q, chunk.key_basis.transpose(1, 2)), chunk.key_latents.transpose(1, 2)) * scale
        else:
            logits = torch.bmm(q, chunk.keys.transpose(1, 2)) * scale
        k_pos = chunk.positions.unsqueeze(1)
        visible = chunk.valid.unsqueeze(1) & (k_pos <= q_pos.unsqueeze(2))
        if sliding_window is not None:
            visible &= q_pos.unsqueeze(2) - k_pos < sliding_window
        logits = logits.masked_fill(~visible, float("-inf"))
        new_max = torch.maximum(running_max, logits.amax(dim=2))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(logits - safe_max.unsqueeze(2))
        correction = torch.exp(running_max - safe_max)
        denom = denom * correction + probs.sum(dim=2)
        if latent:  # latents past a row's end are zeros
            acc = acc * correction.unsqueeze(2) + torch.bmm(torch.bmm(probs, chunk.value_latents), chunk.value_basis)
        else:
            values = chunk.values  # empty slots may hold garbage (0 × NaN): zero them, when a chunk has any
            if not bool(chunk.valid.all()):
                values = values.masked_fill(~chunk.valid.unsqueeze(2), 0.0)
            acc = acc * correction.unsqueeze(2) + torch.bmm(probs, values)
        running_max = new_max
    return acc / denom.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(2)


def smooth_keys(keys: torch.Tensor) -> torch.Tensor:
    """K minus its mean over the tokens, per channel (SageAttention). Exact for attention: every score of a query
    moves by the same q·mean, which the softmax cancels; and it removes the channel offsets that would otherwise
    take most of K's int8 range."""
    return keys - keys.mean(dim=-2, keepdim=True)


def int8_blocks(x: torch.Tensor, block: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of x [..., tokens, dim] with one float32 scale per `block` tokens: codes [..., tokens,
    dim] int8 and scales [..., ceil(tokens / block)], x ≈ codes * scale of its block. `bits` < 8: codes of that
    width (in [-(2^(bits-1) - 1), 2^(bits-1) - 1]), still held in int8."""
    tokens = x.shape[-2]
    blocks = -(-tokens // block)
    top = 2 ** (bits - 1) - 1
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, blocks * block - tokens))
    grouped = padded.unflatten(-2, (blocks, block))
    largest = grouped.abs().amax(dim=(-2, -1)).clamp_min(1e-8)
    # a tensor divisor: on CUDA, torch divides by a Python number as a multiply by its reciprocal (an ulp off the
    # quotient), on the CPU it divides; the Triton codes kernel divides as IEEE does (`tl.div_rn`)
    scales = largest / torch.full_like(largest, top)
    codes = torch.round(grouped / scales[..., None, None]).clamp(-top, top).to(torch.int8)
    return codes.flatten(-3, -2)[..., :tokens, :], scales


def int8_prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                           block_m: int = 64, block_n: int = 64, pv_fp8: bool = False) -> torch.Tensor:
    """Causal attention [batch, q_heads, q_len, dim] (float32) of queries over keys and values [batch, kv_heads,
    kv_len, dim] (GQA: q_heads a multiple of kv_heads; the queries are the last q_len positions), with the scores
    computed from int8 codes: Q per `block_m` queries, smoothed K per `block_n` keys, each block with its own
    scale. Approximate by the int8 rounding of Q and K (half a step each); softmax and P·V are exact here, unless
    `pv_fp8`: then P (times 448) and V (per channel, max |v| -> 448) are rounded to float8 e4m3 before P·V."""
    group = query.shape[1] // key.shape[1]
    q_codes, q_scales = int8_blocks(query, block_m)
    k_codes, k_scales = int8_blocks(smooth_keys(key.float()), block_n)
    q_len, kv_len = query.shape[2], key.shape[2]
    q_scale = q_scales.repeat_interleave(block_m, dim=-1)[..., :q_len]
    k_scale = k_scales.repeat_interleave(block_n, dim=-1)[..., :kv_len].repeat_interleave(group, dim=1)
    keys = k_codes.float().repeat_interleave(group, dim=1)
    values = value.float()
    if pv_fp8:
        value_scales = values.abs().amax(dim=-2, keepdim=True).clamp_min(1e-8) / 448
        values = (values / value_scales).to(torch.float8_e4m3fn).float() * value_scales
    values = values.repeat_interleave(group, dim=1)
    out = torch.empty(*query.shape[:3], value.shape[-1], device=query.device)
    for rows in _row_chunks(q_len, kv_len, query.shape[0] * query.shape[1]):
        seen = slice(0, rows.stop + kv_len - q_len)  # the keys up to the chunk's last query
        scores = q_codes[:, :, rows].float() @ keys[:, :, seen].transpose(-1, -2)
        scores = scores * q_scale[..., rows, None] * k_scale[..., None, seen] * scale
        causal = torch.arange(seen.stop, device=query.device)[None, :] <= (
            torch.arange(rows.start, rows.stop, device=query.device)[:, None] + kv_len - q_len)
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        if pv_fp8:
            weights = (weights * 448).to(torch.float8_e4m3fn).float() / 448
        out[:, :, rows] = weights @ values[:, :, seen]
    return out


def _row_chunks(rows: int, columns: int, heads: int, elements: int = 1 << 25) -> Iterator[slice]:
    """Slices of `rows` query rows whose [heads, chunk, columns] float32 scores stay near `elements` (128 MiB): the
    references' memory stays bounded at long contexts."""
    step = max(1, elements // max(1, heads * columns))
    return (slice(first, min(first + step, rows)) for first in range(0, rows, step))


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                           scale: float, block: int) -> torch.Tensor:
    """Causal attention [batch, q_heads, tokens, dim] (float32) where query block i reads key block j only if
    block_mask[batch, q_head, i, j] (blocks of `block` tokens; GQA as in `int8_prefill_attention`). A query whose
    selected blocks hold no visible key gets zeros."""
    group = query.shape[1] // key.shape[1]
    tokens = query.shape[2]
    positions = torch.arange(tokens, device=query.device)
    blocks = positions // block
    keys = key.float().repeat_interleave(group, 1)
    values = value.float().repeat_interleave(group, 1)
    out = torch.empty(*query.shape[:3], value.shape[-1], device=query.device)
    for rows in _row_chunks(tokens, tokens, query.shape[0] * query.shape[1]):
        seen = slice(0, rows.stop)  # the keys up to the chunk's last query: the rest are masked for every row
        picked = block_mask[..., blocks[rows], :].repeat_interleave(block, dim=-1)[..., seen]
        visible = picked & (positions[seen][None, :] <= positions[rows, None])
        scores = (query[:, :, rows].float() @ keys[:, :, seen].transpose(-1, -2)) * scale
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, :, rows] = weights @ values[:, :, seen]
    return out
