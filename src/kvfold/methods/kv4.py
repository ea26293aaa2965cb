"""`kv4`: QServe's KV4 — keys and values quantized per token and KV head (asymmetric, float16 scale and zero), with
SmoothAttention: each key channel is first divided by λ_c = (max |K_c|)^α so outlier channels stop dominating every
token's grid; the factor returns on the query side (q·k = (q ⊙ λ)·(k / λ)), so attention is unchanged.

Lin et al., "QServe: W4A8KV4 Quantization and System Co-design for Efficient LLM Serving", MLSys 2025
(arXiv:2405.04532), Section 4.2 (SmoothAttention) and the KV4 format.

How this differs from the paper: QServe calibrates λ offline and folds it into the query and key projection weights
(which is why it pairs the RoPE channels i and i + d/2: a scale must commute with RoPE before it can enter the
weights). kvfold scales the cached post-RoPE keys, so any per-channel λ is exact and no pairing is needed, and it
measures λ on each page of `group` tokens (one float16 per channel per page, stored) instead of a calibration set,
so nothing has to be fitted per model. `alpha=0` turns smoothing off (plain per-token KV4, QServe's baseline).
Approximate: each element is rounded to its token's grid, at most half a step times λ_c, which the tests bound.
The Triton decode kernel reads the pages directly (codes de-quantized in registers, as for KIVI).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVFoldError
from ..kernels.reference import SCALE_DTYPE, Quantized, channel_scales, dequantize, quantize
from ..pages import Field
from .base import Quantizer, check_fraction, register


@register("kv4")
@dataclass(frozen=True)
class KV4(Quantizer):
    """Per-token asymmetric K/V codes (4 bits by default) with SmoothAttention on the keys."""

    paper = "QServe (Lin et al., 2024)"

    bits: int = 4
    group: int = 64
    residual: int = 128
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("kv4: alpha", self.alpha, "the smoothing strength; 0 = off, QServe uses 0.5")

    def fields(self, head_dim: int) -> dict[str, Field]:
        if head_dim * self.bits % 8:
            raise KVFoldError(f"kv4: head_dim {head_dim} cannot be packed at {self.bits} bits")
        codes = Field((self.group, head_dim * self.bits // 8), torch.uint8)
        per_token = Field((self.group,), SCALE_DTYPE)
        return {"k_codes": codes, "k_scale": per_token, "k_zero": per_token, "k_smooth": Field((head_dim,), SCALE_DTYPE),
                "v_codes": codes, "v_scale": per_token, "v_zero": per_token, "pos": Field((self.group,), torch.int32)}

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        smooth, smoothed = channel_scales(keys, self.alpha)
        k = quantize(smoothed, self.bits, reduce_dims=(-1,))
        v = quantize(values, self.bits, reduce_dims=(-1,))
        return {"k_codes": k.codes, "k_scale": k.scale, "k_zero": k.zero, "k_smooth": smooth,
                "v_codes": v.codes, "v_scale": v.scale, "v_zero": v.zero}

    def decode(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        per_token = lambda s: s.unsqueeze(-1)  # noqa: E731
        k = dequantize(Quantized(fields["k_codes"], fields["k_scale"], fields["k_zero"]), self.bits, per_token)
        k = k * fields["k_smooth"].float().unsqueeze(-2)
        v = dequantize(Quantized(fields["v_codes"], fields["v_scale"], fields["v_zero"]), self.bits, per_token)
        return k.flatten(-3, -2), v.flatten(-3, -2)

    def kernel_part(self, tensors: dict[str, torch.Tensor], head_dim: int) -> dict:
        return dict(keys=tensors["k_codes"], values=tensors["v_codes"], bits=self.bits, key_scale=tensors["k_scale"],
                    key_zero=tensors["k_zero"], key_smooth=tensors["k_smooth"], value_scale=tensors["v_scale"],
                    value_zero=tensors["v_zero"], value_group=head_dim)
