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
