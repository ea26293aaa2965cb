"""Kernels and their dispatch. `reference.py` defines what each computes; Triton kernels (decode.py) run on CUDA
where they are tested equal to it. `KVFOLD_KERNELS=reference` forces the references; `KVFOLD_KERNELS=triton`
forces the kernels (on the CPU only under `TRITON_INTERPRET=1`, which the tests use)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from ..errors import KVFoldError


def use_triton(device: torch.device) -> bool:
    """Whether attention on `device` should run the Triton kernels (decode, and the prefill choices)."""
    choice = os.environ.get("KVFOLD_KERNELS", "auto")
    if choice == "reference" or importlib.util.find_spec("triton") is None:
        return False
    if choice == "triton":
        return True
    return device.type == "cuda"


INT8_BLOCKS = {"block_m": 64, "block_n": 128}  # queries, keys per int8 scale of the int8 prefill (kernel and reference)


@dataclass(frozen=True)
class PrefillAttention:
    """How a model's first prefill attends, from `KVFOLD_PREFILL`: `sdpa` (default, exact), `int8[:pv=fp8]`
    (SageAttention-style int8 scores, P·V in 16 bits or float8, `kernels.prefill`) or
    `sparse[:gamma=0.95,tau=0.1,block=64,estimate=pooled,rows=8,reduce=sum]` (FlexPrefill, `kernels.sparse`;
    `estimate=int4` or `int8`: the pattern from SALE-style low-bit scores of `rows` sampled queries per block,
    `pattern.lowbit_mask`, in place of FlexPrefill's pooled estimate; `reduce=max`: its blocks weighed by their
    largest score). The choice sets the math: where the
    kernel does not run (`kernel_fits`: the CPU, float32 activations) its reference computes the same, in float32
    and row chunks, so the approximation is the same on every machine (and measurable on the CPU)."""

    kind: str = "sdpa"
    gamma: float = 0.95
    tau: float = 0.1
    block: int = 64
    pv: str = "16"
    estimate: str = "pooled"
    rows: int = 8
    reduce: str = "sum"

    def __post_init__(self) -> None:
        if self.kind not in ("sdpa", "int8", "sparse"):
            raise KVFoldError(f"KVFOLD_PREFILL={self.kind!r}: use sdpa, int8 or sparse[:gamma=G,tau=T,block=B]")
        if not 0 < self.gamma <= 1 or not 0 <= self.tau <= 1:
            raise KVFoldError(f"KVFOLD_PREFILL: gamma must be in (0, 1] and tau in [0, 1], got {self.gamma}, {self.tau}")
        if self.block < 16 or self.block & (self.block - 1):
            raise KVFoldError(f"KVFOLD_PREFILL: block must be a power of two >= 16, got {self.block}")
        if self.pv not in ("16", "fp8"):
            raise KVFoldError(f"KVFOLD_PREFILL: pv must be 16 or fp8, got {self.pv!r}")
        if self.estimate not in ("pooled", "int4", "int8"):
            raise KVFoldError(f"KVFOLD_PREFILL: estimate must be pooled, int4 or int8, got {self.estimate!r}")
        if self.reduce not in ("sum", "max"):
            raise KVFoldError(f"KVFOLD_PREFILL: reduce must be sum or max, got {self.reduce!r}")
        if self.rows < 1 or self.rows & (self.rows - 1) or self.rows > self.block:
            raise KVFoldError(f"KVFOLD_PREFILL: rows must be a power of two <= block ({self.block}), got {self.rows}")

    @classmethod
    def from_env(cls) -> "PrefillAttention":
        kind, _, knobs = os.environ.get("KVFOLD_PREFILL", "sdpa").strip().partition(":")
        values: dict = {}
        for knob in filter(None, knobs.split(",")):
            name, _, value = knob.partition("=")
            sparse_knobs = ("gamma", "tau", "block", "estimate", "rows", "reduce")
            if not (kind == "sparse" and name in sparse_knobs or (kind, name) == ("int8", "pv")):
                raise KVFoldError(f"KVFOLD_PREFILL: unknown knob {name!r} for {kind!r} (sparse takes "
                                  f"{', '.join(sparse_knobs)}; int8 takes pv)")
            try:
                values[name] = {"gamma": float, "tau": float, "block": int, "rows": int}.get(name, str)(value)
            except ValueError:
                raise KVFoldError(f"KVFOLD_PREFILL: {name}={value!r} is not a number") from None
        return cls(kind, **values)

    def applies(self, unpadded: bool, kwargs: dict) -> bool:
        """Whether this prefill takes the chosen attention: a plain causal pattern (`unpadded`, no sliding window or
        soft-capping). Else it runs SDPA (exact)."""
        plain = kwargs.get("sliding_window") is None and kwargs.get("softcap") is None
        return self.kind != "sdpa" and plain and unpadded

    def kernel_fits(self, query: torch.Tensor) -> bool:
        """Whether the Triton kernel computes it here (`use_triton`: CUDA, or forced), with 16-bit activations and a
        power-of-two head_dim for Triton's tiles; else the reference does (same math, float32, row chunks)."""
        dim = query.shape[-1]
        tiles = dim >= (32 if self.kind == "int8" else 16) and not dim & (dim - 1)  # int8 dots reduce over >= 32
        return use_triton(query.device) and query.dtype in (torch.float16, torch.bfloat16) and tiles

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention [batch, tokens, q_heads, dim] in the query's dtype (the layout attention functions
        return), by the chosen kernel or its reference."""
        from . import reference

        kernel = self.kernel_fits(query)
        if self.kind == "int8" and kernel:
            from .prefill import int8_prefill

            out = int8_prefill(query, key, value, scale, pv_fp8=self.pv == "fp8")
        elif self.kind == "int8":
            out = reference.int8_prefill_attention(query, key, value, scale, **INT8_BLOCKS, pv_fp8=self.pv == "fp8")
        else:
            from .pattern import flexprefill_mask, lowbit_mask

            lists = None
            if self.estimate == "pooled":
                mask, _ = flexprefill_mask(query, key, scale, self.gamma, self.tau, self.block)
            else:
                estimate_kernel = kernel and query.shape[-1] >= 32  # its int8 dot products reduce over >= 32 channels
                selection = lowbit_mask(query, key, scale, self.gamma, self.block, int(self.estimate[3:]), self.rows,
                                        kernel=estimate_kernel, reduce=self.reduce, lists=estimate_kernel)
                mask, lists = selection if estimate_kernel else (selection, None)
            if kernel:
                from .sparse import sparse_prefill

                out = sparse_prefill(query, key, value, mask, scale, self.block, lists=lists)
            else:
                out = reference.block_sparse_attention(query, key, value, mask, scale, self.block)
        return out.transpose(1, 2).contiguous().to(query.dtype)
