"""Every method registers itself on import; `kvfold.compressor` composes them from spec strings."""

from . import (adakv, chunkkv, duo, expected, fp8, h2o, kivi, knorm, merge, none, pyramidkv, rotate, snapkv,  # noqa: F401
               streaming, taskkv, tova, zipvl)
from .base import REGISTRY, Budget, Merger, Method, Quantizer, Rotation, ScoreInputs, Scorer, register

__all__ = ["REGISTRY", "Budget", "Merger", "Method", "Quantizer", "Rotation", "ScoreInputs", "Scorer", "register"]
