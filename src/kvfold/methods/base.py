"""The method contract: scorers (which tokens matter), budgets (how many to keep where), quantizers (how tokens
are packed). Each method is a frozen dataclass config registered by name; spec strings parse into them
(see `kvfold.compressor`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import KVFoldError
from ..pages import Field

REGISTRY: dict[str, type["Method"]] = {}
PROTECTED = 2.0**50  # scores at or above this mark protected tokens (sink, window); raw scores stay below it
COMMITTED = 2.0**51  # tokens eviction may no longer remove (packed ones) rank above every protected one (exact)


def register(name: str):
    """Class decorator: make a method config available under `name` in spec strings and the CLI."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in REGISTRY:
            raise KVFoldError(f"method name '{name}' is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class Method:
    """Base of every method config: a name, a kind, a paper, and validated knobs."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    positional: ClassVar[str | None] = None  # the knob a bare value sets, e.g. `snapkv:0.5` -> ratio

    def spec(self) -> str:
        """Canonical spec string: the positional knob as a bare value, then knobs that differ from defaults."""
        parts = [str(getattr(self, self.positional))] if self.positional else []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default and f.name != self.positional:
                parts.append(f"{f.name}={value}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def knobs(cls) -> dict[str, object]:
        return {f.name: f.default for f in dataclasses.fields(cls)}


def check_bool(name: str, value: bool, what: str) -> None:
    if not isinstance(value, bool):
        raise KVFoldError(f"{name} must be true or false ({what}), got {value!r}")


def check_int(name: str, value: int, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KVFoldError(f"{name} must be an integer >= {low} ({what}), got {value!r}")


def check_fraction(name: str, value: float, what: str, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise KVFoldError unless `value` is a number in [0, 1], either end open as asked (ratios, shares, ranks)."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not (number and (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)):
        bounds = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise KVFoldError(f"{name} must be in {bounds} ({what}), got {value!r}")


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer sees for one layer: the observation-window queries and the candidate keys/values."""

    queries: torch.Tensor  # [batch, q_heads, window, head_dim], RoPE applied
    query_positions: torch.Tensor  # [window] sequence index of each window query
    keys: torch.Tensor  # [batch, kv_heads, tokens, head_dim], RoPE applied
    values: torch.Tensor  # [batch, kv_heads, tokens, head_dim]
    positions: torch.Tensor  # [batch, kv_heads, tokens] sequence index of each key
    valid: torch.Tensor  # [batch, kv_heads, tokens] bool: False for padding / empty slots
    scale: float
    inv_freq: torch.Tensor | None = None  # [rotary_dim / 2] the layer's RoPE frequencies (None: no RoPE known)


@dataclass(frozen=True)
class Scorer(Method):
    """Eviction: score every token of a row; the budget keeps the highest. Protected tokens score +inf.

    `ratio` is the fraction of tokens removed (0 keeps everything); `budget` > 0 replaces it with a fixed number
    of tokens kept per row. `window` newest tokens and `sink` first tokens are always kept. `every` > 0 re-applies
    the budget every that many decoded tokens (decode-time compression). `chunk` > 1 scores spans instead of
    tokens (ChunkKV, Liu et al. 2025, arXiv:2502.00299): positions `[c * chunk, (c + 1) * chunk)` share the mean raw
    score of their held tokens, so a budget keeps or drops a phrase (a number's digits, a name) whole. `detect` > 1
    also protects detected attention sinks wherever they are: keys that receive at least `detect` times the mean
    attention share from the last `SINK_PROBE` window queries (`detected_sinks`; 20 matches `kvfold inspect`).
    """

    kind: ClassVar[str] = "scorer"
    query_aware: ClassVar[bool] = False
    observes_all: ClassVar[bool] = False  # True: at prefill `ScoreInputs.queries` holds every prompt query, not the window
    attention_mass: ClassVar[bool] = False  # True: raw scores are attention probabilities (mass-threshold budgets)
    needs_rope: ClassVar[bool] = False  # True: `ScoreInputs.inv_freq` must hold the model's RoPE frequencies
    positional: ClassVar[str | None] = "ratio"

    ratio: float = 0.5
    window: int = 32
    sink: int = 0
    every: int = 0
    budget: int = 0
    chunk: int = 0
    detect: float = 0.0

    def __post_init__(self) -> None:
        check_fraction(f"{self.name}: ratio", self.ratio, "the fraction of tokens removed", high_open=True)
        check_int(f"{self.name}: window", self.window, 0, "newest tokens always kept")
        check_int(f"{self.name}: sink", self.sink, 0, "first tokens always kept")
        check_int(f"{self.name}: every", self.every, 0, "decode steps between re-compressions; 0 = prefill only")
        check_int(f"{self.name}: budget", self.budget, 0, "tokens kept per row; 0 = use the ratio")
        check_int(f"{self.name}: chunk", self.chunk, 0, "positions per scored span; 0 or 1 = single tokens")
        if isinstance(self.detect, bool) or not isinstance(self.detect, (int, float)) or not (
                self.detect == 0 or self.detect > 1):
            raise KVFoldError(f"{self.name}: detect must be 0 (off) or a factor > 1 over the mean attention share "
                              f"that marks a key as a sink, got {self.detect!r}")
        if self.budget:
            default_ratio = type(self).__dataclass_fields__["ratio"].default
            if self.ratio != default_ratio:
                raise KVFoldError(f"{self.name}: give either a ratio or a token budget=, not both")
            if self.budget < self.window + self.sink:
                raise KVFoldError(f"{self.name}: budget={self.budget} is smaller than the protected tokens "
                                  f"(sink={self.sink} + window={self.window}); raise the budget or shrink them")

    @property
    def fixed_size(self) -> bool:
        """True when the scorer keeps a fixed number of tokens (`budget=`) rather than a ratio of them."""
        return bool(self.budget)

    def keep_count(self, n_valid: torch.Tensor) -> torch.Tensor:
        """Tokens each row keeps out of `n_valid` (per batch element): the ratio or the token budget, never below
        the protected span."""
        if self.budget:
            return torch.clamp(n_valid.long(), max=self.budget)
        keep = torch.ceil((1 - self.ratio) * n_valid.double()).long()
        return torch.minimum(torch.maximum(keep, torch.full_like(keep, self.window + self.sink)), n_valid)

    def raw_score(self, x: ScoreInputs) -> torch.Tensor:
        """Importance of each key, [batch, kv_heads, tokens]; higher is kept first."""
        raise NotImplementedError

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """`raw_score` (float64) with protected tokens at PROTECTED + position and invalid slots at -inf."""
        scores = self.raw_score(x).double()
        if self.chunk > 1:
            scores = chunk_mean(scores, x.positions, x.valid, self.chunk)
        newest = x.positions.masked_fill(~x.valid, -1).amax(dim=-1, keepdim=True)
        oldest = x.positions.masked_fill(~x.valid, 2**62).amin(dim=-1, keepdim=True)
        protected = (x.positions > newest - self.window) | (x.positions < oldest + self.sink)
        if self.detect:
            protected |= detected_sinks(x, self.detect)
        # Protected tokens rank above any raw score, newest first, so a budget below the protected span keeps the
        # newest; PROTECTED + position is exact in float64 (positions < 2**31, PROTECTED = 2**50).
        scores = torch.where(protected, PROTECTED + x.positions.double(), scores)
        return scores.masked_fill(~x.valid, float("-inf"))


def window_attention(x: ScoreInputs, keys_end: int | None = None) -> torch.Tensor:
    """Causal softmax attention of `x.queries` over the keys, each query head against its GQA group's KV head:
    [batch, q_heads, window, tokens] in float32. A query sees the valid keys at or before its position.
    `keys_end`: only the first key slots, when the caller knows no query sees a later one ([..., keys_end]).
    Shared by every attention-scored method (snapkv's window, h2o's query chunks, tova's newest query) and by
    sink detection (`Scorer.detect`).
    """
    batch, q_heads, window, dim = x.queries.shape
    kv_heads = x.keys.shape[1]
    tokens = x.keys.shape[2] if keys_end is None else keys_end
    group = q_heads // kv_heads
    # The group's queries side by side against their KV head's keys: a broadcast over the group would copy the
    # (float32) keys once per query head (670 MB at 4 x 10k tokens of an 8B model's layer).
    queries = x.queries.float().reshape(batch, kv_heads, group * window, dim)
    keys_t = x.keys[:, :, :tokens].float().transpose(-1, -2)
    logits = torch.matmul(queries, keys_t).mul_(x.scale).view(batch, kv_heads, group, window, tokens)
    key_positions = x.positions[..., :tokens].reshape(batch, kv_heads, 1, 1, tokens)
    query_positions = x.query_positions.to(x.positions.device).view(1, 1, 1, window, 1)
    visible = x.valid[..., :tokens].reshape(batch, kv_heads, 1, 1, tokens) & (key_positions <= query_positions)
    attn = torch.softmax(logits.masked_fill_(~visible, float("-inf")), dim=-1).nan_to_num_(0.0)
    return attn.view(batch, q_heads, window, tokens)


SINK_PROBE = 8  # newest observation queries whose attention finds sinks


def probe_attention(x: ScoreInputs, probe: int) -> torch.Tensor:
    """[batch, kv_heads, group * probe, tokens]: `window_attention` of the newest `probe` queries, each KV head's
    GQA group of query heads stacked (shared by sink detection and Task-KV's head semantics)."""
    probe = min(probe, x.queries.shape[2])
    last = ScoreInputs(x.queries[:, :, -probe:], x.query_positions[-probe:], x.keys, x.values, x.positions, x.valid,
                       x.scale)
    attn = window_attention(last)
    batch, q_heads, _, tokens = attn.shape
    kv_heads = x.keys.shape[1]
    return attn.view(batch, kv_heads, q_heads // kv_heads * probe, tokens)


def detected_sinks(x: ScoreInputs, factor: float) -> torch.Tensor:
    """[batch, kv_heads, tokens] bool: keys whose attention from the last `SINK_PROBE` queries (mean over them and the
    GQA group) is at least `factor` x the mean share 1 / (valid keys) of their row — first tokens and secondary
    sinks alike (StreamingLLM's sinks, found by mass rather than position)."""
    mass = probe_attention(x, SINK_PROBE).mean(dim=2)
    share = 1.0 / x.valid.sum(dim=-1, keepdim=True).clamp(min=1)
    return x.valid & (mass >= factor * share)


def chunk_mean(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each valid token's score replaced by the mean over the valid tokens of its row whose positions fall in the
    same span of `chunk` positions; the sum over a span is unchanged (attention mass stays mass)."""
    rows = scores.reshape(-1, scores.shape[-1])
    span = positions.reshape(rows.shape).long() // chunk
    ok = valid.reshape(rows.shape)
    first = span.masked_fill(~ok, 2**62).amin(dim=-1, keepdim=True).clamp(max=2**40)
    bucket = (span - first).masked_fill(~ok, 0)
    buckets = int(bucket.max()) + 1 if bucket.numel() else 1
    weights = ok.double()
    total = rows.new_zeros(rows.shape[0], buckets).scatter_add_(-1, bucket, rows.masked_fill(~ok, 0.0) * weights)
    count = rows.new_zeros(rows.shape[0], buckets).scatter_add_(-1, bucket, weights)
    mean = (total / count.clamp(min=1)).gather(-1, bucket)
    return torch.where(ok, mean, rows).view_as(scores)


@dataclass(frozen=True)
class Budget(Method):
    """How many tokens each row of a layer keeps, from scores and a per-batch-element token count."""

    kind: ClassVar[str] = "budget"
    needs_attention_mass: ClassVar[bool] = False  # True: only for scorers whose scores are attention probabilities

    def select(self, scores: torch.Tensor, keep: torch.Tensor, layer: int = 0, layers: int = 1,
               inputs: ScoreInputs | None = None) -> torch.Tensor:
        """Keep mask [batch, kv_heads, tokens] from scores [batch, kv_heads, tokens] and keep [batch] (per head,
        the layer's uniform share). `layer` of `layers` lets per-layer budgets (pyramids) move tokens across depth;
        `inputs` (what the scorer read) lets a budget look at the heads themselves (Task-KV's head semantics).
        """
        raise NotImplementedError

    def check_model(self, config) -> None:
        """Raise KVFoldError if this budget cannot serve the model of `config` (e.g. a profile of another model)."""


@dataclass(frozen=True)
class PerLayerBudget(Budget):
    """A budget that moves tokens across depth: every KV head of a layer keeps the same count, the protected tokens
    plus the layer's part (`layer_share`) of the uniform share beyond them, never more than the row holds."""

    def layer_share(self, share: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, layer: int,
                    layers: int) -> torch.Tensor:
        """Unprotected tokens (float, before rounding) rows [batch, kv_heads] of layer `layer` keep, given the
        uniform unprotected `share`, the uniform count `keep` and the valid tokens `valid` of each row."""
        raise NotImplementedError

    def counts(self, scores: torch.Tensor, keep: torch.Tensor, layer: int, layers: int) -> torch.Tensor:
        """Tokens each row [batch, kv_heads] of layer `layer` keeps."""
        batch, heads, _ = scores.shape
        protected = (scores >= PROTECTED).sum(dim=-1)
        valid = torch.isfinite(scores).sum(dim=-1)  # invalid slots score -inf; protected ones are finite
        keep = keep.to(scores.device).view(batch, 1).expand(batch, heads)
        fixed = torch.minimum(protected, keep)
        share = self.layer_share((keep - fixed).clamp(min=0).double(), keep, valid, layer, layers)
        counts = fixed + torch.minimum(torch.round(share).long(), valid - protected)
        return torch.maximum(counts, valid.clamp(max=1))

    def select(self, scores: torch.Tensor, keep: torch.Tensor, layer: int = 0, layers: int = 1,
               inputs: ScoreInputs | None = None) -> torch.Tensor:
        batch, heads, tokens = scores.shape
        counts = self.counts(scores, keep, layer, layers)
        return top_mask(scores.reshape(batch * heads, tokens), counts.reshape(-1)).view(batch, heads, tokens)


@dataclass(frozen=True)
class Quantizer(Method):
    """Packs K/V pages. A page is `group` tokens; the newest `residual` tokens stay in full precision, and so do the
    first `sink` tokens of each row (attention sinks, as OSCAR and IntactKV keep them: every query reads them).

    In a chunked prefill with an evicting method, every kept token stays in full precision until the prompt ends
    (`defer=True`, the default), so each chunk may still evict any of them and the kept set is the scorer's own,
    at a peak that holds them at 16 bits. `defer=False` packs them after each chunk's eviction instead, and packed
    tokens are final: later chunks evict only from the full-precision tail (the new chunk plus the residual),
    within the budget less what is packed, so the peak holds the kept tokens packed, at an accuracy cost: each
    chunk's choice is final before later queries can weigh it (needle 1/12 against 5/12 on the embedded model,
    `benchmarks/results/chunked_accuracy_cpu_commit.md`). Decode-time eviction (`every=`) evicts from the tail
    before it packs."""

    kind: ClassVar[str] = "quantizer"
    query_aware: ClassVar[bool] = False
    positional: ClassVar[str | None] = "bits"
    has_kernel: ClassVar[bool] = True  # False: the Triton decode kernel cannot read the pages (the reference does)
    ranks_tokens: ClassVar[bool] = False  # True: pages are arranged by token saliency (`saliency`, `order_page`)

    bits: int = 4
    group: int = 64
    residual: int = 128
    sink: int = 0
    defer: bool = True

    def __post_init__(self) -> None:
        check_bool(f"{self.name}: defer", self.defer, "pack the kept tokens only once a chunked prefill ends")
        if self.bits not in (2, 4, 8):
            raise KVFoldError(f"{self.name}: bits must be 2, 4 or 8, got {self.bits!r}")
        check_int(f"{self.name}: group", self.group, 1, "tokens per quantization group and page")
        check_int(f"{self.name}: residual", self.residual, 0, "newest tokens kept in full precision")
        check_int(f"{self.name}: sink", self.sink, 0, "first tokens of each row kept in full precision")

    @property
    def remembered_queries(self) -> int:
        """Newest queries the layer must remember for this quantizer (to rank tokens it packs while decoding)."""
        return 0

    def fields(self, head_dim: int) -> dict[str, Field]:
        raise NotImplementedError

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pages [pages, group, head_dim] of K and V -> the stored fields of those pages."""
        raise NotImplementedError

    def decode(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored fields of [rows, pages, ...] -> float32 K and V of [rows, pages * group, head_dim]."""
        raise NotImplementedError

    def kernel_part(self, tensors: dict[str, torch.Tensor], head_dim: int) -> dict:
        """The pool's tensors as `kernels.decode.PagedPart` fields (keys, values, scales, format flags)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Rotation(Method):
    """An orthogonal transform of K and V before a quantizer packs them (spreads outlier channels). Attention reads
    the rotated pages with the query rotated the same way, and turns the output back (see `kernels.decode`)."""

    kind: ClassVar[str] = "rotation"
    query_aware: ClassVar[bool] = False

    def matrix(self, head_dim: int, layer_idx: int) -> torch.Tensor:
        """The float32 orthogonal [head_dim, head_dim] matrix R of one layer: stored rows are `x @ R`."""
        raise NotImplementedError

    def matrices(self, head_dim: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys' R, values' R) of one layer: the same matrix unless the method fits them apart (OSCAR)."""
        matrix = self.matrix(head_dim, layer_idx)
        return matrix, matrix

    def clip_ratios(self, layer_idx: int) -> tuple[float, float]:
        """Per-row clip quantiles of rotated (keys, values) before quantizing; 1 leaves rows unclipped."""
        return 1.0, 1.0

    def check_model(self, config) -> None:
        """Raise KVFoldError if this rotation cannot serve the model of `config` (e.g. fitted on another model)."""


@dataclass(frozen=True)
class LowRank(Method):
    """Replaces the prompt's K/V of groups of layers with shared low-rank factors after the prefill (xKV)."""

    kind: ClassVar[str] = "lowrank"
    query_aware: ClassVar[bool] = False

    def check_model(self, config) -> None:
        """Raise KVFoldError if this method cannot serve the model of `config` (e.g. fitted on another model)."""


@dataclass(frozen=True)
class Merger(Method):
    """Folds the tokens an eviction drops into the ones it keeps (changes kept contents, never which are kept)."""

    kind: ClassVar[str] = "merge"
    query_aware: ClassVar[bool] = False

    def merge(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
              valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [batch, heads, tokens, dim]; keep, valid [batch, heads, tokens] bool -> merged keys, values."""
        raise NotImplementedError


def top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the `counts[i]` highest entries of each row of `scores` [rows, n] (counts [rows])."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < counts.to(scores.device).unsqueeze(-1)


@register("uniform")
@dataclass(frozen=True)
class UniformBudget(Budget):
    """Every KV head keeps the same number of tokens."""

    paper = "—"

    def select(self, scores: torch.Tensor, keep: torch.Tensor, layer: int = 0, layers: int = 1,
               inputs: ScoreInputs | None = None) -> torch.Tensor:
        batch, heads, tokens = scores.shape
        counts = keep.repeat_interleave(heads)
        return top_mask(scores.reshape(batch * heads, tokens), counts).view(batch, heads, tokens)
