"""Decode attention over context x batch: the Triton kernels vs SDPA on the full bf16 KV, one run (issue 7's grid).

`decode_kernel.py` times every store at the targets' shape (32k tokens, batch 8); this script spans contexts
(default 4k, 32k, 128k) and batches (1, 8, 32) for the stores the targets name, at GQA 8 (64 query heads / 8 KV
heads, head_dim 128, one layer), each call replayed from a CUDA graph (`do_bench_cudagraph` medians) as the fast
decode loop runs it. Shapes past --max-tokens (batch x context) are skipped, not truncated, and listed as skipped.
Prints and writes OUT.json and OUT.md: ms, x SDPA and the share of the measured copy bandwidth per cell.

    python benchmarks/decode_grid.py --out benchmarks/results/decode_grid_h100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernel import copy_bandwidth, referenced_bytes, store  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kvfold.kernels.decode import paged_decode  # noqa: E402

STORES = (("bf16 pages", "none", None), ("fp8", "fp8", None), ("kivi:4", "kivi:4", None), ("kivi:2", "kivi:2", None),
          ("ragged 25% (bf16)", "none", 0.25))  # ragged: each KV head keeps 5% to 45% of the tokens


def cell(batch: int, tokens: int, group: int, peak: float) -> list[dict]:
    """SDPA and each store at one (batch, context)."""
    kv_heads, dim = 8, 128
    torch.manual_seed(0)
    q = torch.randn(batch, kv_heads * group, 1, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = dim ** -0.5
    sdpa_ms = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=scale),
                                 rep=200, return_mode="median")
    full = 2 * k.numel() * k.element_size()
    rows = [{"batch": batch, "tokens": tokens, "store": "SDPA", "ms": sdpa_ms, "vs_sdpa": 1.0, "bytes": full,
             "of_copy": full / (sdpa_ms / 1e3) / peak}]
    q_pos = torch.full((1,), tokens - 1, dtype=torch.int32, device="cuda")
    rows_q = q.view(batch * kv_heads, group, dim)
    for label, spec, kept in STORES:
        keep = None
        if kept is not None:
            share = torch.linspace(0.05, 0.45, kv_heads, device="cuda").view(1, kv_heads, 1)
            keep = torch.rand(batch, kv_heads, tokens, device="cuda") < share
        layer = store(spec, k, v, keep)
        parts = layer.kernel_parts()
        ms = do_bench_cudagraph(lambda: paged_decode(rows_q, parts, q_pos, scale), rep=200, return_mode="median")
        read = referenced_bytes(layer)
        rows.append({"batch": batch, "tokens": tokens, "store": label, "ms": ms, "vs_sdpa": sdpa_ms / ms,
                     "bytes": read, "of_copy": read / (ms / 1e3) / peak})
        del layer
    for row in rows:
        print(f"batch {batch:3d} x {tokens:6d}: {row['store']:18s} {row['ms']:7.3f} ms {row['vs_sdpa']:5.2f}x SDPA "
              f"{row['of_copy']:5.0%} of copy", flush=True)
    return rows


def markdown(result: dict) -> str:
    labels = ["SDPA"] + [label for label, _, _ in STORES]
    lines = [f"# Decode attention over context x batch: Triton kernels vs SDPA ({result['device']})", "",
             f"- torch {result['torch']}, triton {result['triton']}; GQA {result['group']} "
             f"({8 * result['group']} q heads / 8 KV heads), head_dim 128, one layer; measured copy bandwidth "
             f"{result['copy_bandwidth_tb_s']:.2f} TB/s (read + write); `benchmarks/decode_grid.py`, "
             "`do_bench_cudagraph` medians",
             "- each cell: ms, × SDPA (its own shape, same run), share of the copy bandwidth; issue 7's targets at "
             "32k × batch 8: fp8 ≥ 1.8×, int4 ≥ 3×, int2 ≥ 5×, bf16 pages within 1.1×, ragged 25% ≥ 3×", "",
             "| batch × context | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    cells: dict[tuple, dict] = {}
    for row in result["rows"]:
        cells.setdefault((row["batch"], row["tokens"]), {})[row["store"]] = row
    for (batch, tokens), stores in cells.items():
        lines.append(f"| {batch} × {tokens // 1024}k | " + " | ".join(
            f"{stores[label]['ms']:.3f} ms" + ("" if label == "SDPA" else f", {stores[label]['vs_sdpa']:.2f}×")
            + f", {stores[label]['of_copy']:.0%}" for label in labels) + " |")
    if result["skipped"]:
        lines += ["", "Skipped (batch × context past --max-tokens): "
                  + ", ".join(f"{b} × {t // 1024}k" for b, t in result["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--tokens", default="4096,32768,131072")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--group", type=int, default=8, help="query heads per KV head")
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="largest batch x context timed")
    args = parser.parse_args()
    peak = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "group": args.group, "copy_bandwidth_tb_s": peak / 1e12, "rows": [], "skipped": []}
    for tokens in (int(t) for t in args.tokens.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            if batch * tokens > args.max_tokens:
                result["skipped"].append((batch, tokens))
                continue
            result["rows"] += cell(batch, tokens, args.group, peak)
            torch.cuda.empty_cache()
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # kept if a time limit cuts
            args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
