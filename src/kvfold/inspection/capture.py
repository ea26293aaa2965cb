"""The capture half of `kvfold inspect`: a registered attention function that hands each layer's q, k, v to a
`Recorder`, which reduces them at once, query block by query block (never [heads, n, n] for all layers), then
attends exactly as kvfold does; forward hooks keep the decoder layers' residual-stream norms per token."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import KVFoldError

NAME = "kvfold_inspect"
RECORDER_ATTR = "_kvfold_inspect_recorder"
BLOCK_ELEMENTS = 1 << 24  # attention probabilities held at once per layer (query blocks are sized to fit)
KEYS_NOTE = "post-RoPE keys as the attention function receives them (what the cache stores)"
ROLES = ("streaming", "retrieval", "mixed")


@dataclass(frozen=True)
class InspectConfig:
    """Thresholds and sizes of one inspection; recorded in the profile's `settings`."""

    sink_factor: float = 20.0  # sink: mass share >= sink_factor / n (times the mean share)
    initial_tokens: int = 4  # sinks at positions < this are primary, the rest secondary
    recent_window: int = 64  # keys counted as "recent" for a query: the newest this many
    retrieval_threshold: float = 0.1  # retrieval head: >= this share of the question's attention on the needle
    streaming_threshold: float = 0.9  # streaming head: >= this share on sinks + recent window
    outlier_factor: float = 4.0  # outlier channel: abs-max >= factor x the head's median channel abs-max
    quant_bits: int = 2
    quant_group: int = 64
    top_positions: int = 8  # most-attended positions listed per layer
    max_secondary: int = 32  # secondary sinks listed (strongest first); the total is recorded too
    methods: tuple[str, ...] = ("snapkv:0.5",)  # specs whose kept tokens are mapped; () maps none

    def __post_init__(self) -> None:
        for name in ("sink_factor", "outlier_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
                raise KVFoldError(f"inspect: {name} must be a number > 1, got {value!r}")
        for name in ("retrieval_threshold", "streaming_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise KVFoldError(f"inspect: {name} must be in (0, 1], got {value!r}")
        for name, low in (("initial_tokens", 1), ("recent_window", 1), ("quant_group", 1), ("top_positions", 1),
                          ("max_secondary", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KVFoldError(f"inspect: {name} must be an integer >= {low}, got {value!r}")
        if self.quant_bits not in (2, 4, 8):
            raise KVFoldError(f"inspect: quant_bits must be 2, 4 or 8, got {self.quant_bits!r}")
        object.__setattr__(self, "methods", tuple(self.methods))


@dataclass
class LayerRecord:
    """One layer's reductions (CPU tensors): per query head [heads, n] received mass (all queries and late
    queries), per-head sums over late queries, retrieval sums, and per-channel K/V statistics."""

    received: torch.Tensor
    received_late: torch.Tensor
    entropy: torch.Tensor
    entropy_norm: torch.Tensor
    recent: torch.Tensor
    retrieval: torch.Tensor | None
    keys: dict
    values: dict


class Recorder:
    """Receives q, k, v of each layer from the attention function and reduces them at once, query block by query
    block; keeps the decoder layers' residual-stream norms per token."""

    def __init__(self, config: InspectConfig, n: int, needle: Sequence[int], question: tuple[int, int] | None):
        self.config, self.n = config, n
        self.late = min(config.recent_window, n - 1)  # head means run over queries at positions >= this
        self.needle = torch.tensor(sorted(set(needle)), dtype=torch.long)
        self.question = question if len(self.needle) else None
        self.layers: dict[int, LayerRecord] = {}
        self.norms: dict[int, torch.Tensor] = {}

    def record(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None, scale: float) -> None:
        batch, q_heads, n, dim = query.shape
        kv_heads = keys.shape[1]
        if batch != 1 or n != self.n or keys.shape[2] != n:
            raise KVFoldError("inspect runs one sequence in one forward pass (batch 1, no past cache)")
        group = q_heads // kv_heads
        k = keys[0].float()
        block = max(1, min(n, BLOCK_ELEMENTS // (q_heads * n)))
        device = query.device
        cols = torch.arange(n, device=device)
        received = torch.zeros(q_heads, n, device=device)
        received_late = torch.zeros(q_heads, n, device=device)
        entropy, entropy_norm, recent = (torch.zeros(q_heads, device=device) for _ in range(3))
        retrieval = torch.zeros(q_heads, device=device) if self.question else None
        needle = self.needle.to(device)
        window = min(self.config.recent_window, self.late + 1)  # n <= recent_window: every key is recent
        keys_t = k.transpose(-1, -2).unsqueeze(1)  # [kv_heads, 1, dim, n]
        for start in range(0, n, block):
            end = min(n, start + block)
            width = end - start
            rows = torch.arange(start, end, device=device)
            q = query[0, :, start:end].float().view(kv_heads, group, width, dim)
            logits = torch.matmul(q, keys_t).view(q_heads, width, n).mul_(scale)
            allowed = _allowed(mask, start, end, n, rows, cols)
            logits.masked_fill_(~allowed, torch.finfo(torch.float32).min)  # finite: masked p is exactly 0, p*l is 0
            probs = torch.softmax(logits, dim=-1)  # [q_heads, width, n], contiguous
            # log-sum-exp without another pass of exp: the largest probability is exp(max logit - lse)
            lse = logits.amax(-1) - probs.amax(-1).log()
            first = max(start, self.late) - start  # the block's first late row
            if first > 0:
                received += probs[:, :first].sum(1)
            if first < width:
                late_mass = probs[:, first:].sum(1)
                received += late_mass
                received_late += late_mass
                ent = lse[:, first:] - torch.linalg.vecdot(probs[:, first:], logits[:, first:])
                visible = allowed[first:].sum(-1).clamp_min(2).float()
                entropy += ent.sum(-1)
                entropy_norm += (ent / visible.log()).sum(-1)
                # the band j in (i - window, i] of each late row i, as a strided view (no mask, no copy)
                band = probs.as_strided((q_heads, width - first, window), (width * n, n + 1, 1),
                                        probs.storage_offset() + first * n + start + first - window + 1)
                recent += band.sum((-1, -2))
            if retrieval is not None:
                lo, hi = max(start, self.question[0]), min(end, self.question[1])
                if lo < hi:
                    retrieval += probs[:, lo - start:hi - start][..., needle].sum((-1, -2))
        late_count = n - self.late
        self.layers[layer] = LayerRecord(
            (received / n).cpu(), (received_late / late_count).cpu(), (entropy / late_count).cpu(),
            (entropy_norm / late_count).cpu(), (recent / late_count).cpu(),
            None if retrieval is None else (retrieval / (self.question[1] - self.question[0])).cpu(),
            _channel_stats(k, self.config), _channel_stats(values[0].float(), self.config))

    def hook(self, index: int):
        def store(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.norms[index] = hidden[0].float().norm(dim=-1).cpu()
        return store


def _allowed(mask: torch.Tensor | None, start: int, end: int, n: int, rows: torch.Tensor,
             cols: torch.Tensor) -> torch.Tensor:
    """[block, n] bool: which keys each query of the block may attend to (the model's mask, else causal)."""
    if mask is None:
        return cols.unsqueeze(0) <= rows.unsqueeze(1)
    part = mask[0, 0, start:end, -n:] if mask.dim() == 4 else mask[start:end, -n:]
    return part if part.dtype == torch.bool else part == 0


def _quant_error(x: torch.Tensor, bits: int, dim: int) -> float:
    """Relative squared error of min-max `bits`-bit quantization of x with statistics over `dim`."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    approx = torch.round((x - lo) / scale).clamp_(0, levels) * scale + lo
    return float(((x - approx) ** 2).sum() / (x ** 2).sum().clamp_min(1e-30))


def _channel_stats(x: torch.Tensor, config: InspectConfig) -> dict:
    """x [kv_heads, n, dim]: per-channel abs-max, outlier channels, mean ranges, simulated quantization errors."""
    heads, n, dim = x.shape
    absmax = x.abs().amax(1)  # [heads, dim]
    median = absmax.median(dim=1, keepdim=True).values.clamp_min(1e-12)
    outliers = torch.nonzero(absmax >= config.outlier_factor * median).tolist()
    group = min(config.quant_group, n)
    tokens = n // group * group
    per_channel = _quant_error(x[:, :tokens].reshape(heads, tokens // group, group, dim), config.quant_bits, 2)
    channels = math.gcd(min(config.quant_group, dim), dim)
    per_token = _quant_error(x.reshape(heads, n, dim // channels, channels), config.quant_bits, 3)
    return {"channel_absmax": _round(absmax.tolist()), "outlier_channels": outliers,
            "channel_range_mean": _round((x.amax(1) - x.amin(1)).mean(1).tolist()),
            "token_range_mean": _round((x.amax(2) - x.amin(2)).mean(1).tolist()),
            "quant_error": {"per_channel": _round(per_channel), "per_token": _round(per_token)}}


def _round(value, digits: int = 5):
    """Floats (nested in lists) to `digits` significant digits, to keep the JSON small."""
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _inspect_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Record this layer's statistics (when a recorder is attached), then attend exactly as kvfold does."""
    from ..attention import kvfold_attention
    from ..layer import StagedKV

    recorder = getattr(module, RECORDER_ATTR, None)
    if recorder is not None:
        keys, values = (key.keys, key.values) if isinstance(key, StagedKV) else (key, value)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        recorder.record(module.layer_idx, query, keys, values, attention_mask, scale)
    return kvfold_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and isinstance(
        getattr(m, "layer_idx", None), int)]


@contextlib.contextmanager
def routed_attention(model, name: str, function, attr: str, observer) -> Iterator[None]:
    """Register `function` as attention implementation `name` (SDPA masks), attach `observer` as `attr` on every
    attention module and switch the model to it; undone on exit. Shared by inspect and calibrate."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ..models import check_supported

    check_supported(model.config)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    modules = _attention_modules(model)
    for module in modules:
        setattr(module, attr, observer)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            if hasattr(module, attr):
                delattr(module, attr)


@contextlib.contextmanager
def recording(model, recorder: Recorder) -> Iterator[None]:
    """Route the model's attention through `_inspect_attention` with `recorder` attached; hook decoder layers."""
    decoders = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    handles = [layer.register_forward_hook(recorder.hook(i)) for i, layer in enumerate(decoders)]
    try:
        with routed_attention(model, NAME, _inspect_attention, RECORDER_ATTR, recorder):
            yield
    finally:
        for handle in handles:
            handle.remove()
