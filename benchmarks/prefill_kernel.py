"""Low-bit prefill attention (`kernels.prefill.int8_prefill`) vs SDPA, side by side in one run.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), batch 1, causal, bf16 inputs, at each
--lengths. Keys get a per-channel offset as real keys have (what SageAttention's smoothing is for). Timed: the
whole `int8_prefill` call (the PyTorch quantization pre-pass included) and the kernel alone, each against
`scaled_dot_product_attention` (is_causal, flash backend when available); accuracy: cosine similarity and relative
error against float32 exact attention. Writes OUT.json and OUT.md. Issue 7's aim: >= 1.5x at 16k, cosine >= 0.999.

    python benchmarks/prefill_kernel.py --out benchmarks/results/prefill_kernel_h200
On the CPU (`--device cpu`, TRITON_INTERPRET=1, small --lengths) it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.kernels import prefill  # noqa: E402
from kvfold.kernels.reference import int8_blocks, smooth_keys  # noqa: E402


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    return cpu


def case(length: int, device: str, dtype: torch.dtype, time_ms) -> dict:
    q_heads, kv_heads, dim = 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(1, q_heads, length, dim, device=device, dtype=dtype)
    k = (torch.randn(1, kv_heads, length, dim, device=device) + 4 * torch.randn(1, kv_heads, 1, dim, device=device)).to(dtype)
    v = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
    scale = dim ** -0.5
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)  # noqa: E731
    ours = lambda: prefill.int8_prefill(q, k, v, scale)  # noqa: E731
    q_codes, q_scales = int8_blocks(q, 64)
    k_codes, k_scales = int8_blocks(smooth_keys(k.float()), 64)
    out = torch.empty(1, q_heads, length, dim, device=device, dtype=torch.float32)
    interpreted = -(-length // 64) if os.environ.get("TRITON_INTERPRET") == "1" else 0

    def kernel_only() -> None:
        prefill._int8_prefill_kernel[(-(-length // 64), q_heads)](
            q_codes, q_scales, k_codes, k_scales, v, out, length, length, q_scales.shape[-1], k_scales.shape[-1],
            scale, Q_HEADS=q_heads, GROUP=q_heads // kv_heads, D=dim, BLOCK_M=64, BLOCK_N=64,
            INTERPRETED_BLOCKS=interpreted)

    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale,
                                           enable_gqa=True)
    got, base = ours(), sdpa().float()
    sdpa_ms, ours_ms, kernel_ms = time_ms(sdpa), time_ms(ours), time_ms(kernel_only)
    cosine = F.cosine_similarity(got.flatten(), exact.flatten(), dim=0).item()
    return {"length": length, "sdpa_ms": sdpa_ms, "int8_ms": ours_ms, "kernel_ms": kernel_ms,
            "speedup": sdpa_ms / ours_ms, "kernel_speedup": sdpa_ms / kernel_ms, "cosine": cosine,
            "rel_err": ((got - exact).norm() / exact.norm()).item(),
            "sdpa_rel_err": ((base - exact).norm() / exact.norm()).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768,65536")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        rows.append(case(length, args.device, dtype, timer(args.device)))
        r = rows[-1]
        print(f"{length:6d} tokens: SDPA {r['sdpa_ms']:.3f} ms, int8 {r['int8_ms']:.3f} ms ({r['speedup']:.2f}x; "
              f"kernel alone {r['kernel_ms']:.3f} ms, {r['kernel_speedup']:.2f}x), cosine {r['cosine']:.5f}", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter: not a speed)"
    report = {"device": device, "torch": torch.__version__, "kvfold": kvfold.__version__, "dtype": str(dtype),
              "shape": "batch 1, 32 q heads / 8 KV heads, head_dim 128, causal", "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Low-bit (int8 Q·K) prefill attention vs SDPA ({device}, torch {torch.__version__})", "",
             f"{report['shape']}, {dtype}; `benchmarks/prefill_kernel.py`. int8: the whole call, quantization "
             "pre-pass included; kernel: the Triton kernel alone. Accuracy against float32 exact attention.", "",
             "| tokens | SDPA ms | int8 ms | × SDPA | kernel ms | kernel × SDPA | cosine | rel. error | SDPA rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['sdpa_ms']:.3f} | {r['int8_ms']:.3f} | {r['speedup']:.2f} | {r['kernel_ms']:.3f} | "
              f"{r['kernel_speedup']:.2f} | {r['cosine']:.5f} | {r['rel_err']:.1e} | {r['sdpa_rel_err']:.1e} |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
