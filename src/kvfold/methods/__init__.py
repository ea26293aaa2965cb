"""Every method registers itself on import; `kvfold.compressor` composes them from spec strings."""

from . import adakv, kivi, none, snapkv, streaming  # noqa: F401
from .base import REGISTRY, Budget, Method, Quantizer, ScoreInputs, Scorer, register

__all__ = ["REGISTRY", "Budget", "Method", "Quantizer", "ScoreInputs", "Scorer", "register"]
