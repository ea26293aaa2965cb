"""`kivi`: KIVI — keys quantized per channel, values per token, packed to 2/4/8 bits; the newest tokens stay in
full precision until a whole group of them can be quantized together.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv:2402.02750).
A page holds `group` tokens. Keys: one float16 scale and zero per channel per page (the statistic runs over the
page's tokens). Values: one float16 scale and zero per token per `group` channels (the whole head when
head_dim <= group). The newest tokens stay in full precision (float16, as in KIVI): when the tail passes
`residual`, its oldest whole groups are packed, leaving between `residual - group + 1` and `residual` tokens
(KIVI's rule for keys; values use the same tail here). While decoding, packing runs on a clock shared by all rows
(each time the sequence passes a multiple of `group`, as KIVI packs its residual in bursts), so between ticks the
tail holds up to `group - 1` more tokens; the fast decode loop relies on that clock. Approximate: each value is
rounded to its group's grid, an error of at most half a step (scale / 2) per element, which the tests bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from ..kernels.reference import SCALE_DTYPE, Quantized, dequantize, quantize
from ..pages import Field
from .base import Quantizer, register


@register("kivi")
@dataclass(frozen=True)
class KIVI(Quantizer):
    """Asymmetric min-max quantization: keys per channel, values per token, with a full-precision residual."""

    paper = "KIVI (Liu et al., 2024)"

    def value_group(self, head_dim: int) -> int:
        group = min(self.group, head_dim)
        if head_dim % group:
            raise KVFoldError(f"kivi: head_dim {head_dim} is not a multiple of the value group {group}; pick group= a divisor")
        return group

    def fields(self, head_dim: int) -> dict[str, Field]:
        if head_dim * self.bits % 8:
            raise KVFoldError(f"kivi: head_dim {head_dim} cannot be packed at {self.bits} bits")
        packed = head_dim * self.bits // 8
        value_groups = head_dim // self.value_group(head_dim)
        return {
            "k_codes": Field((self.group, packed), torch.uint8),
            "k_scale": Field((head_dim,), SCALE_DTYPE),
            "k_zero": Field((head_dim,), SCALE_DTYPE),
            "v_codes": Field((self.group, packed), torch.uint8),
            "v_scale": Field((self.group, value_groups), SCALE_DTYPE),
            "v_zero": Field((self.group, value_groups), SCALE_DTYPE),
            "pos": Field((self.group,), torch.int32),
        }

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        k = quantize(keys, self.bits, reduce_dims=(1,))
        vg = self.value_group(values.shape[-1])
        v = quantize(values.unflatten(-1, (-1, vg)), self.bits, reduce_dims=(-1,))
        return {"k_codes": k.codes, "k_scale": k.scale, "k_zero": k.zero,
                "v_codes": v.codes.flatten(-2), "v_scale": v.scale, "v_zero": v.zero}

    def decode(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        k = dequantize(Quantized(fields["k_codes"], fields["k_scale"], fields["k_zero"]), self.bits,
                       lambda s: s.unsqueeze(-2))
        value_groups = fields["v_scale"].shape[-1]
        v = dequantize(Quantized(fields["v_codes"], fields["v_scale"], fields["v_zero"]), self.bits,
                       lambda s: s.repeat_interleave(k.shape[-1] // value_groups, dim=-1))
        return k.flatten(-3, -2), v.flatten(-3, -2)

    def kernel_part(self, tensors: dict[str, torch.Tensor], head_dim: int) -> dict:
        return dict(keys=tensors["k_codes"], values=tensors["v_codes"], bits=self.bits, key_scale=tensors["k_scale"],
                    key_zero=tensors["k_zero"], value_scale=tensors["v_scale"], value_zero=tensors["v_zero"],
                    value_group=head_dim // tensors["v_scale"].shape[-1])
