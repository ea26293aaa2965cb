"""Kernels and their dispatch. `reference.py` defines what each computes; Triton kernels (decode.py) run on CUDA
where they are tested equal to it. `KVFOLD_KERNELS=reference` forces the references; `KVFOLD_KERNELS=triton`
forces the kernels (on the CPU only under `TRITON_INTERPRET=1`, which the tests use)."""

from __future__ import annotations

import importlib.util
import os

import torch


def use_triton(device: torch.device) -> bool:
    """Whether decode attention on `device` should run the Triton kernel."""
    choice = os.environ.get("KVFOLD_KERNELS", "auto")
    if choice == "reference" or importlib.util.find_spec("triton") is None:
        return False
    if choice == "triton":
        return True
    return device.type == "cuda"


def int8_prefill_wanted(query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """Whether a first prefill should run `prefill.int8_prefill` (SageAttention-style int8 scores): only when asked
    (`KVFOLD_PREFILL=int8`), with Triton present (compiled on CUDA, interpreted elsewhere), 16-bit activations, and
    a plain causal pattern (no padding, sliding window or soft-capping) and a power-of-two head_dim."""
    if os.environ.get("KVFOLD_PREFILL", "sdpa") != "int8" or importlib.util.find_spec("triton") is None:
        return False
    plain = kwargs.get("sliding_window") is None and kwargs.get("softcap") is None
    unpadded = attention_mask is None or bool((attention_mask[:, 0, -1] == (0 if attention_mask.dtype != torch.bool
                                                                            else True)).all())
    dim = query.shape[-1]
    tiles = dim >= 16 and not dim & (dim - 1)  # Triton's tiles: a power-of-two head_dim
    return query.dtype in (torch.float16, torch.bfloat16) and plain and unpadded and tiles
