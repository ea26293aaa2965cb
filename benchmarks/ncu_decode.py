"""A few calls of the decode kernel over one store, for Nsight Compute (batch 8 x 32k, Llama-3.1-8B heads):

    ncu --clock-control none --kernel-name regex:kernel --launch-skip 2 --launch-count 1 \
        python benchmarks/ncu_decode.py fp8
(`python benchmarks/decode_kernel.py --out F --sweep-only fp8,kivi:4` times each store under launch options and
split sizes; `gpu_session.sh profile` writes warp-state reports and per-instruction stall samples, which
`benchmarks/ncu_stalls.py` sums by opcode.)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernel import paged_decode, store  # noqa: E402


def main(spec: str, batch: int = 8, tokens: int = 32768, kv_heads: int = 8, group: int = 4, dim: int = 128) -> None:
    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    parts = store(spec, k, torch.randn_like(k)).kernel_parts()
    q = torch.randn(batch * kv_heads, group, dim, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.full((1,), tokens - 1, dtype=torch.int32, device="cuda")
    for _ in range(4):
        paged_decode(q, parts, q_pos, dim ** -0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
