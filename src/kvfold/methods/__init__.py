"""Every method registers itself on import; `kvfold.compressor` composes them from spec strings."""

from . import adakv, duo, expected, fp8, h2o, kivi, knorm, none, pyramidkv, rotate, snapkv, streaming, tova, zipvl  # noqa: F401
from .base import REGISTRY, Budget, Method, Quantizer, Rotation, ScoreInputs, Scorer, register

__all__ = ["REGISTRY", "Budget", "Method", "Quantizer", "Rotation", "ScoreInputs", "Scorer", "register"]
