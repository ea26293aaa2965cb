"""Every method registers itself on import; `kvfold.compressor` composes them from spec strings."""

from . import (actqkv, adakv, chunkkv, duo, expected, fp8, h2o, kivi, knorm, kv4, merge, none, prefixkv,  # noqa: F401
               pyramidkv, rotate, snapkv, streaming, taskkv, tova, triattention, xkv, zipcache, zipvl)
from .base import REGISTRY, Budget, LowRank, Merger, Method, Quantizer, Rotation, ScoreInputs, Scorer, register

__all__ = ["REGISTRY", "Budget", "Merger", "Method", "Quantizer", "Rotation", "ScoreInputs", "Scorer", "register"]
