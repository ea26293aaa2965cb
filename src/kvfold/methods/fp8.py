"""`fp8`: KV stored as 8-bit floats (e4m3 or e5m2) with a float16 scale per token or per page, as serving
engines ship it (vLLM and TensorRT-LLM's FP8 KV cache; the formats are from Micikevicius et al., "FP8 Formats
for Deep Learning", 2022, arXiv:2209.05433).

Each K and V vector of a token is divided by its scale (its absolute maximum over the head's channels over the
format's largest finite value: 448 for e4m3, 57344 for e5m2) and cast to float8, so nothing saturates. With
`scale=page`, one scale covers a page of `group` tokens of one KV head (fewer scale bytes, coarser; `group=16` for
finer scales). With per-token scales `group` only sets the page size: 64-token pages decode about twice as fast as
16-token ones on an H200 (`benchmarks/results/decode_kernel_h200.md`), at the same accuracy. Approximate:
a float8 keeps 3 (e4m3) or 2 (e5m2) mantissa bits, a relative error of at most 2**-4 (e4m3) or 2**-3 (e5m2) of
each element's magnitude, plus the float16 rounding of the scale; values under the format's smallest subnormal
times the scale flush towards zero. The tests bound these errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from ..kernels.reference import SCALE_DTYPE
from ..pages import Field
from .base import Quantizer, check_bool, check_int, register

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
SCALES = ("token", "page")


@register("fp8")
@dataclass(frozen=True)
class FP8(Quantizer):
    """Float8 K/V with a per-token (or per-page) float16 scale per KV head; `residual` newest tokens in float16."""

    paper = "FP8 formats (Micikevicius et al., 2022); FP8 KV as in vLLM / TensorRT-LLM"
    positional = "format"

    bits: int = 8
    group: int = 64
    residual: int = 0
    sink: int = 0
    format: str = "e4m3"
    scale: str = "token"

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise KVFoldError(f"fp8: bits is always 8 (got {self.bits!r}); for 2 or 4 bits use kivi:2 or kivi:4")
        if self.format not in FORMATS:
            raise KVFoldError(f"fp8: format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.scale not in SCALES:
            raise KVFoldError(f"fp8: scale must be 'token' (one per token) or 'page' (one per page of group "
                              f"tokens), got {self.scale!r}")
        check_int("fp8: group", self.group, 1, "tokens per page")
        check_int("fp8: residual", self.residual, 0, "newest tokens kept in full precision")
        check_int("fp8: sink", self.sink, 0, "first tokens of each row kept in full precision")
        check_bool("fp8: defer", self.defer, "pack the kept tokens only once a chunked prefill ends")

    @property
    def dtype(self) -> torch.dtype:
        return FORMATS[self.format]

    def fields(self, head_dim: int) -> dict[str, Field]:
        scales = (self.group,) if self.scale == "token" else (1,)
        return {
            "k": Field((self.group, head_dim), self.dtype),
            "v": Field((self.group, head_dim), self.dtype),
            "k_scale": Field(scales, SCALE_DTYPE),
            "v_scale": Field(scales, SCALE_DTYPE),
            "pos": Field((self.group,), torch.int32),
        }

    def _cast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[pages, group, dim] -> float8 codes and float16 scales [pages, group] (token) or [pages, 1] (page)."""
        dims = (-1,) if self.scale == "token" else (-2, -1)
        amax = x.float().abs().amax(dim=dims, keepdim=True)
        scale = (amax / torch.finfo(self.dtype).max).to(SCALE_DTYPE)
        # Divide by the stored (float16-rounded) scale so the decode reproduces exactly what was cast.
        safe = scale.float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)
        limit = torch.finfo(self.dtype).max
        codes = (x.float() / safe).clamp_(-limit, limit).to(self.dtype)
        return codes, scale.squeeze(-1) if self.scale == "token" else scale.flatten(1)

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        k, k_scale = self._cast(keys)
        v, v_scale = self._cast(values)
        return {"k": k, "v": v, "k_scale": k_scale, "v_scale": v_scale}

    def decode(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        def restore(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return codes.float() * scale.float().unsqueeze(-1)  # [rows, pages, group|1, 1] broadcasts either way

        k, v = restore(fields["k"], fields["k_scale"]), restore(fields["v"], fields["v_scale"])
        return k.flatten(-3, -2), v.flatten(-3, -2)

    def kernel_part(self, tensors: dict[str, torch.Tensor], head_dim: int) -> dict:
        return dict(keys=tensors["k"], values=tensors["v"], key_scale=tensors["k_scale"],
                    value_scale=tensors["v_scale"], scaled=1 if self.scale == "token" else 2)
