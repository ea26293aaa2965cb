"""A few calls of the decode kernel over one store, for Nsight Compute (batch 8 x 32k, Llama-3.1-8B heads):

    ncu --clock-control none --kernel-name regex:pages_kernel --launch-skip 2 --launch-count 1 \
        python benchmarks/ncu_decode.py fp8
or, with --sweep, each store's call timed (CUDA graph replay) under several launch options:
    python benchmarks/ncu_decode.py fp8,kv4:4 --sweep
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernel import paged_decode, store  # noqa: E402


LAUNCHES = [dict(num_warps=4, num_stages=2), dict(num_warps=4, num_stages=3), dict(num_warps=4, num_stages=4),
            dict(num_warps=8, num_stages=2), dict(num_warps=8, num_stages=3), dict(num_warps=4, num_stages=3, maxnreg=96),
            dict(num_warps=2, num_stages=3), dict(num_warps=4, num_stages=1), dict(num_warps=4, num_stages=2, maxnreg=128),
            dict(num_warps=2, num_stages=2)]


def sweep(specs: str, batch: int = 8, tokens: int = 32768, kv_heads: int = 8, group: int = 4, dim: int = 128) -> None:
    from triton.testing import do_bench_cudagraph

    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch * kv_heads, group, dim, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.full((1,), tokens - 1, dtype=torch.int32, device="cuda")
    for spec in specs.split(","):
        parts = store(spec, k, torch.randn_like(k)).kernel_parts()
        for launch in LAUNCHES:
            try:
                ms = do_bench_cudagraph(lambda: paged_decode(q, parts, q_pos, dim ** -0.5, launch=launch), rep=200,
                                        return_mode="median")
                print(f"{spec:8s} {launch}: {ms:.3f} ms", flush=True)
            except Exception as error:  # noqa: BLE001 - an option the device refuses is a result
                print(f"{spec:8s} {launch}: {type(error).__name__}", flush=True)


def main(spec: str, batch: int = 8, tokens: int = 32768, kv_heads: int = 8, group: int = 4, dim: int = 128) -> None:
    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    parts = store(spec, k, torch.randn_like(k)).kernel_parts()
    q = torch.randn(batch * kv_heads, group, dim, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.full((1,), tokens - 1, dtype=torch.int32, device="cuda")
    for _ in range(4):
        paged_decode(q, parts, q_pos, dim ** -0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    sweep(sys.argv[1]) if "--sweep" in sys.argv else main(sys.argv[1])
