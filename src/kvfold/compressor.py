"""A `Compressor` is an ordered composition: a scorer under a budget (evict), an optional merge of what is evicted,
an optional rotation, then a quantizer (pack).

Spec strings, as the CLI and the Python API take them:

    none                        keep everything
    snapkv:0.75                 SnapKV scores, 75% of tokens removed, same count per head
    snapkv:0.75@adakv           ... with one budget per layer shared across heads (Ada-KV)
    adakv:0.5                   shorthand for snapkv:0.5@adakv
    streaming:sink=4,window=512 StreamingLLM with a fixed window
    kivi:2                      KIVI 2-bit (group 64, residual 128)
    snapkv:0.75+kivi:4          evict, then quantize what is kept
    snapkv:0.75+merge+rotate+fp8  evict, fold evicted tokens into kept ones, rotate, store as float8
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import methods  # noqa: F401  (registers every method)
from .errors import KVFoldError, closest
from .methods.base import REGISTRY, Budget, LowRank, Merger, Method, Quantizer, Rotation, Scorer, UniformBudget


def _parse_value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_args(cls: type[Method], text: str, spec: str) -> dict[str, object]:
    """'0.5,window=64' -> {'ratio': 0.5, 'window': 64} for `cls` (the bare value sets its positional knob)."""
    kwargs: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            if cls.positional is None or cls.positional in kwargs:
                raise KVFoldError(f"in '{spec}': '{part}' needs a name (knob=value); {cls.name} knobs: {_knob_list(cls)}")
            key, value = cls.positional, part
        key = key.strip()
        if not value.strip():
            raise KVFoldError(f"in '{spec}': knob '{key}' has no value")
        kwargs[key] = _parse_value(value.strip())
    return kwargs


def _knob_list(cls: type[Method]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cls.knobs().items()) or "none"


def _build(cls: type[Method], kwargs: dict[str, object], spec: str) -> Method:
    known = cls.knobs()
    if kwargs.get("budget") and "ratio" in kwargs:
        raise KVFoldError(f"in '{spec}': {cls.name}: give either a ratio or a token budget=, not both")
    for key in kwargs:
        if key not in known:
            raise KVFoldError(f"in '{spec}': {cls.name} has no knob '{key}'{closest(key, known)}; knobs: {_knob_list(cls)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise KVFoldError(f"in '{spec}': {err}") from None


def _lookup(name: str, spec: str) -> type[Method]:
    if not name:
        raise KVFoldError(f"malformed method spec '{spec}': empty method name (example: snapkv:0.5+kivi:4)")
    if name not in REGISTRY:
        raise KVFoldError(f"unknown method '{name}'{closest(name, REGISTRY)}; run `kvfold methods` for the list")
    return REGISTRY[name]


@dataclass(frozen=True)
class Compressor:
    """scorer (+ budget), then rotation, then quantizer. `Compressor.parse("snapkv:0.75+kivi:4")` builds one."""

    scorer: Scorer = field(default_factory=lambda: REGISTRY["none"]())
    budget: Budget = field(default_factory=UniformBudget)
    quantizer: Quantizer | None = None
    rotation: Rotation | None = None
    merger: Merger | None = None  # `merge`: evicted tokens folded into kept ones
    lowrank: LowRank | None = None  # `xkv`: the prompt's K/V of layer groups as shared low-rank factors

    def __post_init__(self) -> None:
        if self.budget.needs_attention_mass and not self.scorer.attention_mass:
            raise KVFoldError(f"the {self.budget.name} budget reads scores as attention mass; {self.scorer.name} "
                              f"scores are not (use snapkv, h2o or tova)")
        if self.merger is not None and not self.evicts:
            raise KVFoldError(f"{self.merger.name} folds evicted tokens into kept ones; add an eviction method, "
                              f"e.g. 'snapkv:0.5+{self.merger.spec()}'")
        if self.rotation is not None and self.quantizer is None:
            raise KVFoldError(f"{self.rotation.name} rotates K/V before a quantizer packs them; add one, "
                              f"e.g. '{self.rotation.spec()}+kivi:4'")
        if self.lowrank is not None and (self.evicts or self.quantizer is not None or self.merger is not None):
            raise KVFoldError(f"{self.lowrank.name} factors the whole prompt of groups of layers; it does not compose "
                              f"with eviction, merging or quantizers yet: use '{self.lowrank.spec()}' alone")

    @property
    def evicts(self) -> bool:
        return self.scorer.name != "none"

    @property
    def query_aware(self) -> bool:
        return self.scorer.query_aware

    @property
    def spec(self) -> str:
        parts = []
        if self.lowrank is not None:
            return self.lowrank.spec()
        if self.evicts or self.quantizer is None:
            parts.append(self.scorer.spec() + ("" if isinstance(self.budget, UniformBudget) else "@" + self.budget.spec()))
        if self.merger is not None:
            parts.append(self.merger.spec())
        if self.rotation is not None:
            parts.append(self.rotation.spec())
        if self.quantizer is not None:
            parts.append(self.quantizer.spec())
        return "+".join(parts)

    def __str__(self) -> str:
        return self.spec

    @classmethod
    def parse(cls, spec: str) -> "Compressor":
        if not isinstance(spec, str) or not spec.strip():
            raise KVFoldError("empty method spec: give e.g. 'none', 'snapkv:0.5' or 'snapkv:0.5+kivi:4'")
        scorer = budget = quantizer = rotation = merger = lowrank = None
        for component in spec.replace(" ", "").split("+"):
            head, _, budget_part = component.partition("@")
            name, _, args = head.partition(":")
            method_cls = _lookup(name, spec)
            new_budget = None
            if issubclass(method_cls, Budget):  # adakv:0.5 == snapkv:0.5@adakv
                if budget_part:
                    raise KVFoldError(f"in '{spec}': '{name}' is already a budget; it takes no '@'")
                budget_cls, method_cls = method_cls, REGISTRY["snapkv"]
                kwargs = _parse_args(method_cls, args, spec)
                own = {k: kwargs.pop(k) for k in list(kwargs) if k in budget_cls.knobs()}
                new_budget = _build(budget_cls, own, spec)
            else:
                kwargs = _parse_args(method_cls, args, spec)
            if budget_part:
                budget_name, _, budget_args = budget_part.partition(":")
                budget_cls = _lookup(budget_name, spec)
                if not issubclass(budget_cls, Budget):
                    raise KVFoldError(f"in '{spec}': '@{budget_name}' is not a budget (budgets: {_names(Budget)})")
                new_budget = _build(budget_cls, _parse_args(budget_cls, budget_args, spec), spec)
            method = _build(method_cls, kwargs, spec)
            if isinstance(method, Scorer):
                if scorer is not None:
                    raise KVFoldError(f"in '{spec}': two eviction methods ({scorer.name}, {method.name}); use one")
                scorer, budget = method, new_budget
            elif isinstance(method, Quantizer):
                if new_budget is not None:
                    raise KVFoldError(f"in '{spec}': a budget (@) applies to an eviction method, not to {method.name}")
                if quantizer is not None:
                    raise KVFoldError(f"in '{spec}': two quantizers ({quantizer.name}, {method.name}); use one")
                quantizer = method
            elif isinstance(method, Rotation):
                if new_budget is not None or rotation is not None:
                    raise KVFoldError(f"in '{spec}': use at most one rotation, without '@'")
                rotation = method
            elif isinstance(method, Merger):
                if new_budget is not None or merger is not None:
                    raise KVFoldError(f"in '{spec}': use at most one merge, without '@'")
                merger = method
            elif isinstance(method, LowRank):
                if new_budget is not None or lowrank is not None:
                    raise KVFoldError(f"in '{spec}': use at most one low-rank method, without '@'")
                lowrank = method
        return cls(scorer or REGISTRY["none"](), budget or UniformBudget(), quantizer, rotation, merger, lowrank)


def _names(kind: type[Method]) -> str:
    return ", ".join(sorted(n for n, c in REGISTRY.items() if issubclass(c, kind)))


def registered_methods() -> dict[str, type[Method]]:
    """Every registered method config by name (scorers, budgets, quantizers)."""
    return dict(sorted(REGISTRY.items()))

