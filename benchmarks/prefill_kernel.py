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


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn) -> float:
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    return cpu


def launch_sweep(length: int, device: str, dtype: torch.dtype, time_ms, launches: list[dict]) -> list[dict]:
    """Every launch choice timed on the whole call at `length` tokens, P·V in 16 bits (fastest first) and in
    float8 (`fp8_ms`); one that does not compile (shared memory, an unsupported option) is recorded as failed."""
    q, k, v, scale = inputs(length, device, dtype)
    rows = []
    for row in launches:
        launch = {name: value for name, value in row.items() if name != "K_BLOCK"}
        k_block = row.get("K_BLOCK", 64)
        try:
            rows.append({**row, "ms": time_ms(lambda: prefill.int8_prefill(q, k, v, scale, k_block=k_block,
                                                                           launch=launch)),
                         "fp8_ms": time_ms(lambda: prefill.int8_prefill(q, k, v, scale, k_block=k_block,
                                                                        launch=launch, pv_fp8=True))})
        except Exception as error:  # noqa: BLE001 - a launch the device refuses is a result, not a crash
            rows.append({**row, "ms": None, "error": f"{type(error).__name__}: {str(error)[:200]}"})
    return sorted(rows, key=lambda r: float("inf") if r["ms"] is None else r["ms"])


def parse_launches(text: str) -> list[dict]:
    """'BLOCK_M=128,BLOCK_N=128,num_warps=8,num_stages=3,TMA=1;...' -> launch dicts."""
    return [{key: int(value) for key, value in (pair.split("=") for pair in item.split(","))}
            for item in text.split(";") if item]


# the H200 sweep of 2026-12-03 (benchmarks/results/prefill_kernel_h200.md): tiles, warps, stages, bulk copies
# (TMA) and keys per int8 scale (K_BLOCK; a multiple of BLOCK_N folds the key tile's scale into the query's)
LAUNCHES = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, TMA=tma, K_BLOCK=kb)
            for m, n, w, st, tma, kb in ((64, 128, 4, 2, 1, 128), (64, 64, 4, 2, 1, 64), (128, 128, 8, 3, 1, 128),
                                         (64, 128, 4, 3, 1, 128), (128, 128, 8, 3, 0, 64), (64, 128, 4, 2, 0, 128),
                                         (64, 128, 8, 2, 1, 128))]


def inputs(length: int, device: str, dtype: torch.dtype):
    q_heads, kv_heads, dim = 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(1, q_heads, length, dim, device=device, dtype=dtype)
    k = (torch.randn(1, kv_heads, length, dim, device=device) + 4 * torch.randn(1, kv_heads, 1, dim, device=device)).to(dtype)
    v = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
    return q, k, v, dim ** -0.5


def exact_attention(q, k, v, scale: float, rows: int = 1024) -> torch.Tensor:
    """Float32 causal attention, `rows` queries at a time (one [heads, n, n] score matrix would not fit)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    for start in range(0, q.shape[2], rows):
        end = min(start + rows, q.shape[2])
        scores = (q[:, :, start:end].float() @ k[:, :, :end].transpose(-1, -2)) * scale
        hidden = torch.arange(end, device=q.device)[None, :] > torch.arange(start, end, device=q.device)[:, None]
        out[:, :, start:end] = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1) @ v[:, :, :end]
    return out


def sdpa_calls(q, k, v, scale: float) -> dict:
    """SDPA as PyTorch picks its backend, and pinned to the flash backend (issue 7's baseline), K/V repeated to
    the query heads beforehand (outside the timing) where the backend takes no GQA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True, scale=scale)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)}
    if q.is_cuda:
        calls["flash"] = flash
    return calls


def case(length: int, device: str, dtype: torch.dtype, time_ms, launch: dict, k_block: int = 64) -> dict:
    q, k, v, scale = inputs(length, device, dtype)
    q_heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
    sdpa_variants = sdpa_calls(q, k, v, scale)
    sdpa = sdpa_variants["sdpa"]
    ours = lambda: prefill.int8_prefill(q, k, v, scale, k_block=k_block, launch=launch)  # noqa: E731
    ours_fp8 = lambda: prefill.int8_prefill(q, k, v, scale, k_block=k_block, launch=launch, pv_fp8=True)  # noqa: E731
    quantize = lambda: (prefill.int8_codes(q, 64, False), prefill.int8_codes(k, k_block, True))  # noqa: E731
    (q_codes, q_scales), (k_codes, k_scales) = quantize()
    out = torch.empty_like(q)
    options = {**prefill.PREFILL_LAUNCH, **launch}
    interpreted = -(-length // options["BLOCK_N"]) if os.environ.get("TRITON_INTERPRET") == "1" else 0
    keys, values, tma = prefill.tile_sources(k_codes, v.contiguous(), options, False)

    def kernel_only() -> None:
        prefill._int8_prefill_kernel[(-(-length // options["BLOCK_M"]), q_heads)](
            q_codes, q_scales, keys, k_scales, values, k_scales, out, length, length, q_scales.shape[-1],
            k_scales.shape[-1], length, scale * prefill.LOG2E, Q_HEADS=q_heads, GROUP=q_heads // kv_heads, D=dim,
            Q_GROUP=64, K_GROUP=k_block, PV_FP8=False, INTERPRETED_BLOCKS=interpreted,
            **{**options, "TMA": tma})

    exact = exact_attention(q, k, v, scale)
    got, base = ours().float(), sdpa().float()
    sdpa_ms, ours_ms, kernel_ms, quantize_ms = time_ms(sdpa), time_ms(ours), time_ms(kernel_only), time_ms(quantize)
    flash_ms = time_ms(sdpa_variants["flash"]) if "flash" in sdpa_variants else float("nan")
    fp8_ms, got_fp8 = time_ms(ours_fp8), ours_fp8().float()
    cosine = F.cosine_similarity(got.flatten(), exact.flatten(), dim=0).item()
    flops = 4 * length * length * dim * q_heads / 2  # causal: half of QK^T and PV
    return {"length": length, "sdpa_ms": sdpa_ms, "flash_ms": flash_ms, "flash_speedup": flash_ms / ours_ms,
            "int8_ms": ours_ms, "fp8_pv_ms": fp8_ms, "fp8_pv_flash_speedup": flash_ms / fp8_ms,
            "fp8_pv_cosine": F.cosine_similarity(got_fp8.flatten(), exact.flatten(), dim=0).item(), "kernel_ms": kernel_ms,
            "quantize_ms": quantize_ms, "speedup": sdpa_ms / ours_ms, "kernel_speedup": sdpa_ms / kernel_ms,
            "sdpa_tflops": flops / sdpa_ms / 1e9, "int8_tflops": flops / ours_ms / 1e9, "cosine": cosine,
            "rel_err": ((got - exact).norm() / exact.norm()).item(),
            "sdpa_rel_err": ((base - exact).norm() / exact.norm()).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768,65536")
    parser.add_argument("--sweep", type=int, default=16384, help="tokens at which launches are swept (0: none)")
    parser.add_argument("--launches", default="", help="launches to sweep: key=value pairs separated by ',', "
                        "launches by ';' (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA, WS, and K_BLOCK: keys per int8 "
                        "scale); default: the seven of `LAUNCHES`")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16
    launches = parse_launches(args.launches) if args.launches else LAUNCHES
    sweep = launch_sweep(args.sweep, args.device, dtype, timer(args.device), launches) if args.sweep else []
    for r in sweep:
        print(f"  launch {r}", flush=True)
    launch = {name: value for name, value in sweep[0].items() if name not in ("ms", "fp8_ms", "error")} if sweep else {}
    k_block = launch.pop("K_BLOCK", 64)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        rows.append(case(length, args.device, dtype, timer(args.device), launch, k_block))
        r = rows[-1]
        print(f"{length:6d} tokens: SDPA {r['sdpa_ms']:.3f} ms, flash {r['flash_ms']:.3f} ms, int8 {r['int8_ms']:.3f} ms ({r['speedup']:.2f}x; "
              f"kernel alone {r['kernel_ms']:.3f} ms, {r['kernel_speedup']:.2f}x), cosine {r['cosine']:.5f}; fp8 P·V "
              f"{r['fp8_pv_ms']:.3f} ms ({r['fp8_pv_flash_speedup']:.2f}x flash), cosine {r['fp8_pv_cosine']:.5f}", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter: not a speed)"
    report = {"device": device, "torch": torch.__version__, "kvfold": kvfold.__version__, "dtype": str(dtype),
              "shape": "batch 1, 32 q heads / 8 KV heads, head_dim 128, causal",
              "launch": {**prefill.PREFILL_LAUNCH, **launch}, "k_block": k_block, "sweep_tokens": args.sweep,
              "sweep": sweep, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Low-bit (int8 Q·K) prefill attention vs SDPA ({device}, torch {torch.__version__})", "",
             f"{report['shape']}, {dtype}; `benchmarks/prefill_kernel.py`. int8: the whole call, quantization "
             "pre-pass included; SDPA: the backend PyTorch picks; SDPA flash: pinned to "
             "the flash backend (issue 7's baseline); kernel: the Triton kernel alone; quantize: the pre-pass alone. Launch "
             f"{report['launch']}, an int8 scale per 64 queries and per {k_block} keys (fastest of {len(sweep)} "
             f"swept at {args.sweep} tokens). Accuracy against float32 "
             "exact attention; TFLOP/s count the causal half.", "",
             "| tokens | SDPA ms | SDPA flash ms | int8 ms | × flash | × SDPA | kernel ms | kernel × SDPA | quantize ms | SDPA TFLOP/s | int8 TFLOP/s "
             "| cosine | rel. error | SDPA rel. error | fp8 P·V ms | fp8 P·V × flash | fp8 P·V cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['sdpa_ms']:.3f} | {r['flash_ms']:.3f} | {r['int8_ms']:.3f} | "
              f"{r['flash_speedup']:.2f} | {r['speedup']:.2f} | {r['kernel_ms']:.3f} | "
              f"{r['kernel_speedup']:.2f} | {r['quantize_ms']:.3f} | {r['sdpa_tflops']:.0f} | {r['int8_tflops']:.0f} | "
              f"{r['cosine']:.5f} | {r['rel_err']:.1e} | {r['sdpa_rel_err']:.1e} | "
              f"{r['fp8_pv_ms']:.3f} | {r['fp8_pv_flash_speedup']:.2f} | {r['fp8_pv_cosine']:.5f} |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
