"""Statistics for `kvfold report`: 95% intervals of a mean score, the accuracy-vs-memory Pareto front, and the
aggregation of result rows into report groups.

Intervals (stated in every report): when every score of a group is 0 or 1, the Wilson score interval of the
proportion (it stays inside [0, 1] and is sensible at 0/n and n/n); otherwise the Student t interval of the mean,
clipped to [0, 1], with the t quantile computed exactly from the t distribution's closed-form CDF for integer
degrees of freedom (no SciPy). Each answered question counts as one observation, so questions that share a context
(multi-turn) are treated as independent: the intervals are then somewhat too narrow.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import KVFoldError

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided ``LEVEL`` interval; ``method`` is "wilson" or "t" ("none" when n = 1 with
    non-binary scores: no interval can be given, ``low``/``high`` are None)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    method: str


def wilson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n``."""
    if n < 1:
        raise KVFoldError("an interval needs at least one score")
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact ends where rounding would leave 1e-17
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4, exact finite sums)."""
    if df < 1:
        raise KVFoldError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2/pi) * (theta + sin * (cos + 2/3 cos^3 + ... up to cos^(df-2)))
        term, total = c, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0  # even: sin * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The t such that P(|T| < t) = ``level`` for integer ``df`` (bisection on :func:`t_cdf_two_sided`)."""
    if not 0 < level < 1:
        raise KVFoldError(f"level must be in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while t_cdf_two_sided(high, df) < level:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf_two_sided(mid, df) < level else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def mean_interval(scores: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of ``scores`` (each in [0, 1]) with a Wilson interval when all are 0/1, else a t interval."""
    values = [float(v) for v in scores]
    if not values:
        raise KVFoldError("an interval needs at least one score")
    n, mean = len(values), statistics.fmean(values)
    if all(v in (0.0, 1.0) for v in values):
        low, high = wilson(sum(values), n, level)
        return Interval(mean, low, high, n, "wilson")
    if n == 1:
        return Interval(mean, None, None, 1, "none")
    half = t_quantile(level, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, max(0.0, mean - half), min(1.0, mean + half), n, "t")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, score) points, whether each is on the front: no other point costs no more and scores no less
    while being better in one of the two. Equal points are all kept."""
    return [not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2 in points) for c, s in points]


def method_family(method: str, ratio: float | None) -> str:
    """The spec without its ratio, for the method x ratio heat-map: ``snapkv:0.5@adakv`` -> ``snapkv@adakv``.
    Specs without a ratio (``none``, ``kivi:4``, fixed budgets) are their own family."""
    if ratio is None:
        return method
    first, plus, rest = method.partition("+")
    head, at, budget = first.partition("@")
    name, _, args = head.partition(":")
    knobs = [a for a in args.split(",") if a] if args else []
    if knobs and _same_number(knobs[0], ratio):
        knobs = knobs[1:]
    elif any(k.startswith("ratio=") and _same_number(k[6:], ratio) for k in knobs):
        knobs = [k for k in knobs if not (k.startswith("ratio=") and _same_number(k[6:], ratio))]
    return f"{name}{':' + ','.join(knobs) if knobs else ''}{at}{budget}{plus}{rest}"


def _same_number(text: str, value: float) -> bool:
    try:
        return math.isclose(float(text), value)
    except ValueError:
        return False


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


@dataclass(frozen=True)
class Group:
    """The rows of one (model, task, setting, method) of a report, summarised."""

    model: str
    task: str
    setting: str
    method: str
    ratio: float | None
    family: str
    score: Interval
    kv_bytes: float
    kv_plain: float
    prefill_seconds: float | None
    decode_tps: float | None
    lengths: tuple[int, ...]
    by_length: dict[int, float]
    perplexity: float | None = None  # exp of the token-weighted mean NLL (teacher-forced `ppl` rows), else None

    @property
    def compression(self) -> float | None:
        """Uncompressed bytes over held bytes (4.0 = the cache is 4x smaller)."""
        return self.kv_plain / self.kv_bytes if self.kv_bytes else None


def aggregate(rows: Iterable[dict]) -> list[Group]:
    """One :class:`Group` per (model, task, setting, method), in first-seen order."""
    buckets: dict[tuple, list[dict]] = {}
    for row in rows:
        buckets.setdefault((row["model"], row["task"], row["setting"], row["method"]), []).append(row)
    groups = []
    for (model, task, setting, method), group in buckets.items():
        ratio = group[0].get("ratio")
        lengths = sorted({r["length"] for r in group})
        groups.append(Group(
            model, task, setting, method, ratio, method_family(method, ratio), mean_interval([r["score"] for r in group]),
            statistics.fmean(r["kv_bytes"] for r in group), statistics.fmean(r["kv_bytes_uncompressed"] for r in group),
            _mean(r.get("prefill_seconds") for r in group), _mean(r.get("decode_tokens_per_second") for r in group),
            tuple(lengths), {n: statistics.fmean(r["score"] for r in group if r["length"] == n) for n in lengths},
            _perplexity(group)))
    return groups


def _perplexity(rows: list[dict]) -> float | None:
    """exp(mean NLL per evaluated token) over rows with ``nll`` and ``eval_tokens``; None when none has them."""
    scored = [(r["nll"], r["eval_tokens"]) for r in rows
              if isinstance(r.get("nll"), (int, float)) and isinstance(r.get("eval_tokens"), int) and r["eval_tokens"]]
    if not scored:
        return None
    return math.exp(sum(nll * n for nll, n in scored) / sum(n for _, n in scored))


@dataclass(frozen=True)
class SpeedPoint:
    """Mean prefill seconds and decode tokens/s of one (model, setting, method, length), over tasks."""

    model: str
    setting: str
    method: str
    length: int
    context_tokens: float
    prefill_seconds: float | None
    decode_tps: float | None
    n: int


def speed_by_length(rows: Iterable[dict]) -> list[SpeedPoint]:
    """Speed per (model, setting, method, length), sorted by length within each method."""
    buckets: dict[tuple, list[dict]] = {}
    for row in rows:
        buckets.setdefault((row["model"], row["setting"], row["method"], row["length"]), []).append(row)
    points = [SpeedPoint(model, setting, method, length,
                         statistics.fmean(r.get("prompt_tokens") or r["length"] for r in group),
                         _mean(r.get("prefill_seconds") for r in group),
                         _mean(r.get("decode_tokens_per_second") for r in group), len(group))
              for (model, setting, method, length), group in buckets.items()]
    order = list(dict.fromkeys((p.model, p.setting, p.method) for p in points))
    return sorted(points, key=lambda p: (order.index((p.model, p.setting, p.method)), p.length))


SETTING_NAMES = {"aware": "query-aware", "agnostic": "query-agnostic"}


@dataclass(frozen=True)
class Section:
    """The groups of one (model, task, setting), ordered by family (first seen) then ratio, with each group's
    place on the Pareto front of (KV bytes held, mean score)."""

    model: str
    task: str
    setting: str
    groups: tuple[Group, ...]
    front: tuple[bool, ...]

    def title(self, with_model: bool = False) -> str:
        text = f"{self.task} · {SETTING_NAMES.get(self.setting, self.setting)}"
        return f"{text} · {self.model}" if with_model else text


def sections(groups: Sequence[Group]) -> list[Section]:
    """Split groups by (model, task, setting), in first-seen order, and mark each section's Pareto front."""
    families = list(dict.fromkeys(g.family for g in groups))
    by_key: dict[tuple[str, str, str], list[Group]] = {}
    for group in groups:
        by_key.setdefault((group.model, group.task, group.setting), []).append(group)
    out = []
    for (model, task, setting), members in by_key.items():
        members.sort(key=lambda g: (families.index(g.family), -1.0 if g.ratio is None else g.ratio))
        front = pareto_front([(g.kv_bytes, g.score.mean) for g in members])
        out.append(Section(model, task, setting, tuple(members), tuple(front)))
    return out
