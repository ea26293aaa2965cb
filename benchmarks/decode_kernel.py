"""Decode attention over kvfold's paged store: the Triton kernel vs SDPA on full bf16 KV, side by side in one run.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), one layer, batch 8, 32k tokens
(`--group 8`: 64 query heads, Llama-3.1-70B's GQA 8).
Prints (and writes as JSON) time per call, speed-up over SDPA, bytes read and achieved bandwidth beside the
measured copy bandwidth, plus the kernel's error against the reference at full size.

    python benchmarks/decode_kernel.py --out decode_kernel.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.layer import KVFoldLayer  # noqa: E402
from kvfold.compressor import Compressor  # noqa: E402
from kvfold.kernels.decode import TILE_TOKENS, paged_decode  # noqa: E402
from kvfold.kernels.reference import paged_attention  # noqa: E402


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting read + write."""
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms / 1e3)


def store(spec: str, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor | None = None,
          page_size: int = 64) -> KVFoldLayer:
    layer = KVFoldLayer(Compressor.parse(spec), page_size=page_size)
    layer.lazy_initialization(keys, values)
    tokens = keys.shape[2]
    layer.seen = tokens
    keep = keep if keep is not None else torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    layer._append_rows(keys, values, torch.arange(tokens, device=keys.device), keep)
    return layer


def referenced_bytes(layer: KVFoldLayer) -> int:
    return sum(rows.nbytes() for rows in (layer.full, layer.packed) if rows is not None)


def accuracy(dims=(64, 128), groups=(1, 4, 8), tokens=4096, batch=4) -> list[dict]:
    rows = []
    for dim in dims:
        for group in groups:
            for spec in ("none", "kivi:8", "kivi:4", "kivi:2", "fp8", "rotate+kivi:4", "kv4:4", "kv4:2", "ragged"):
                kv_heads = 4
                k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                keep = torch.rand(batch, kv_heads, tokens, device="cuda") < torch.rand(batch, kv_heads, 1, device="cuda")
                layer = store(spec.replace("ragged", "none"), k, v, keep if spec == "ragged" else None)
                q = torch.randn(batch * kv_heads, group, dim, device="cuda", dtype=torch.bfloat16)
                pos = tokens - 1
                ref = paged_attention(q.float(), torch.full((group,), pos, device="cuda"), layer.chunks(),
                                      dim ** -0.5)
                for label, query in (("bf16 query", q), ("fp32 query", q.float())):
                    got = paged_decode(query, layer.kernel_parts(), pos, dim ** -0.5)
                    err = ((got - ref).norm() / ref.norm()).item()
                    rows.append({"dim": dim, "group": group, "store": spec, "mode": label, "rel_err": err})
    return rows


def speed(batch: int, tokens: int, peak: float, only: tuple[str, ...] = (), group: int = 4) -> list[dict]:
    kv_heads, dim = 8, 128
    q = torch.randn(batch, kv_heads * group, 1, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = dim ** -0.5
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=scale)  # noqa: E731
    sdpa_ms = do_bench(sdpa, warmup=50, rep=300, return_mode="median")
    sdpa_graph_ms = do_bench_cudagraph(sdpa, rep=300, return_mode="median")
    full_bytes = 2 * k.numel() * k.element_size()
    results = [{"store": "SDPA, full bf16 KV", "ms": sdpa_ms, "vs_sdpa": 1.0, "bytes": full_bytes,
                "tb_s": full_bytes / sdpa_ms / 1e9, "of_peak": full_bytes / (sdpa_ms / 1e3) / peak,
                "graph_ms": sdpa_graph_ms, "graph_vs_sdpa": 1.0, "graph_of_peak": full_bytes / (sdpa_graph_ms / 1e3) / peak}]
    q_pos = torch.full((1,), tokens - 1, dtype=torch.int32, device="cuda")
    rows_q = q.view(batch, kv_heads, group, dim).reshape(batch * kv_heads, group, dim)
    torch.manual_seed(0)
    uniform = torch.rand(batch, kv_heads, tokens, device="cuda").argsort(-1).argsort(-1) < tokens // 2
    share = torch.linspace(0.1, 0.9, kv_heads, device="cuda").view(1, kv_heads, 1).expand(batch, kv_heads, 1)
    ragged = torch.rand(batch, kv_heads, tokens, device="cuda") < share
    quarter = torch.rand(batch, kv_heads, tokens, device="cuda").argsort(-1).argsort(-1) < tokens // 4
    share_25 = torch.linspace(0.05, 0.45, kv_heads, device="cuda").view(1, kv_heads, 1).expand(batch, kv_heads, 1)
    ragged_25 = torch.rand(batch, kv_heads, tokens, device="cuda") < share_25
    cases = [("none (bf16 pages)", "none", None), ("uniform 50% (bf16)", "none", uniform),
             ("ragged 10-90% per head (bf16)", "none", ragged), ("uniform 25% (bf16)", "none", quarter),
             ("ragged 5-45% per head, 25% kept (bf16)", "none", ragged_25), ("kivi:4", "kivi:4", None),
             ("kivi:2", "kivi:2", None), ("ragged + kivi:4", "kivi:4", ragged), ("fp8 (e4m3, scale/token)", "fp8", None),
             ("fp8 (e4m3, scale/page)", "fp8:scale=page", None),
             ("fp8 (scale/token, 16-token pages)", "fp8:group=16", None),
             ("fp8 (scale/page of 16)", "fp8:scale=page,group=16", None), ("rotate+kivi:4", "rotate+kivi:4", None),
             ("kv4:4 (per-token, smoothed keys)", "kv4:4", None), ("kv4:2", "kv4:2", None),
             ("none, 16-token pages, one a step", "none", None, dict(page_size=16, tile_tokens=0)),
             ("none, 16-token pages, 64 tokens a step", "none", None, dict(page_size=16, tile_tokens=64)),
             ("fp8, 16-token pages, one a step", "fp8:group=16", None, dict(tile_tokens=0)),
             ("none, batch-invariant (serve's joint step)", "none", None, dict(batch_invariant=True)),
             ("kivi:4, batch-invariant (serve's joint step)", "kivi:4", None, dict(batch_invariant=True))]
    cases = [case for case in cases if not only or any(part in case[0] for part in only)]
    none_ms = None
    for run, (label, spec, keep, *options) in enumerate(cases * 2):  # two passes: the spread between them is the noise
        label = f"{label} [pass {run // len(cases) + 1}]"
        options = options[0] if options else {}
        layer = store(spec, k, v, keep, options.get("page_size", 64))
        parts = layer.kernel_parts()
        call = lambda: paged_decode(rows_q, parts, q_pos, scale, tile_tokens=options.get("tile_tokens", TILE_TOKENS),  # noqa: E731
                                    batch_invariant=options.get("batch_invariant", False))
        ms = do_bench(call, warmup=50, rep=300, return_mode="median")
        graph_ms = do_bench_cudagraph(call, rep=300, return_mode="median")
        none_ms = graph_ms if spec == "none" and keep is None and not options else none_ms
        kept = layer.stored_tokens / (batch * kv_heads * tokens)
        read = referenced_bytes(layer)
        results.append({"store": label, "ms": ms, "vs_sdpa": sdpa_ms / ms, "bytes": read, "kept": kept,
                        "tb_s": read / ms / 1e9, "of_peak": read / (ms / 1e3) / peak, "graph_ms": graph_ms,
                        "graph_vs_sdpa": sdpa_graph_ms / graph_ms, "graph_of_peak": read / (graph_ms / 1e3) / peak,
                        "vs_ideal": graph_ms / (kept * none_ms) if keep is not None and spec == "none" else None})
        del layer
    return results


LAUNCHES = ((4, 1, None), (4, 2, None), (4, 3, None), (8, 2, None), (2, 2, None), (2, 3, None), (1, 2, None),
            (1, 3, None), (4, 2, 128), (2, 3, 128), (2, 3, 168))


def sweep(batch: int, tokens: int, specs: tuple[str, ...] = ("none", "kivi:4", "kivi:2"),
          launches: tuple = LAUNCHES, splits: tuple = (None, 8, 16, 32), group: int = 4) -> list[dict]:
    """Time per call of each store under Triton launch options (num_warps, num_stages, maxnreg) and split sizes
    (pages per program; None: the default, about 4 programs per multiprocessor), to pick the defaults. A spec
    `ragged25:<spec>` keeps 5% to 45% of each row's tokens by head. `group`: query heads per KV head (GQA 8, or a
    few-token turn's n x 4 queries, gives the packed kernels taller tiles). Each launch's output is compared with
    the default launch's (relative difference): an option timed is an option that computes the same."""
    kv_heads, dim = 8, 128
    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch * kv_heads, group, dim, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.full((1,), tokens - 1, dtype=torch.int32, device="cuda")
    rows = []
    for spec in specs:
        keep = None
        if spec.startswith("ragged25:"):  # heads keeping 5% to 45% of the tokens (a quarter on average)
            share = torch.linspace(0.05, 0.45, kv_heads, device="cuda").view(1, kv_heads, 1)
            keep = torch.rand(batch, kv_heads, tokens, device="cuda") < share
        parts = store(spec.removeprefix("ragged25:"), k, v, keep).kernel_parts()
        default = paged_decode(q, parts, q_pos, dim ** -0.5)  # each launch's output is checked against it
        for launch in launches:
            if not isinstance(launch, dict):
                warps, stages, registers = launch
                launch = dict(num_warps=warps, num_stages=stages, **({"maxnreg": registers} if registers else {}))
            for pages_per_split in splits:
                call = lambda: paged_decode(q, parts, q_pos, dim ** -0.5, launch=launch,  # noqa: E731
                                            pages_per_split=pages_per_split)
                ms = do_bench_cudagraph(call, rep=200, return_mode="median")
                apart = ((call() - default).norm() / default.norm()).item()
                rows.append({"store": spec, **launch, "pages_per_split": pages_per_split, "graph_ms": ms,
                             "rel_diff_vs_default": apart})
                print(f"sweep {spec:8s} {launch} pages/split {pages_per_split}: {ms:.3f} ms (graph), "
                      f"{apart:.1e} from the default launch", flush=True)
    return rows


def parse_launch(item: str) -> tuple | dict:
    """'warps,stages[,maxnreg]' or 'num_warps=1,num_stages=3,COLUMNS=0' (any launch option or kernel constant)."""
    if "=" in item:
        return {key: int(value) for key, value in (pair.split("=") for pair in item.split(","))}
    numbers = [int(x) for x in item.split(",")]
    return tuple(numbers) + (None,) * (3 - len(numbers))


def report(result: dict) -> None:
    worst = {}
    for row in result["accuracy"]:
        key = (row["store"], row["mode"])
        worst[key] = max(worst.get(key, 0.0), row["rel_err"])
    print(f"device {result['device']} · copy bandwidth {result['copy_bandwidth_tb_s']:.2f} TB/s · {result['shape']}")
    print("worst relative error vs reference (head_dim 64/128, GQA 1/4/8, 4096 ragged tokens):")
    for (spec, mode), err in worst.items():
        print(f"  {spec:10s} {mode:10s} {err:.2e}")
    print("eager: one call as Python issues it (launches, allocation, the split merge); graph: the same call replayed "
          "from a CUDA graph, as the fast decode loop runs it")
    print(f"{'store':40s} {'eager ms':>8s} {'x SDPA':>7s} {'graph ms':>8s} {'x SDPA':>7s} {'GB read':>8s} "
          f"{'of copy':>7s} {'vs ideal':>8s}")
    for row in result["speed"]:
        ideal = f"{row['vs_ideal']:.2f}" if row.get("vs_ideal") else "—"
        print(f"{row['store']:40s} {row['ms']:8.3f} {row['vs_sdpa']:7.2f} {row['graph_ms']:8.3f} "
              f"{row['graph_vs_sdpa']:7.2f} {row['bytes'] / 1e9:8.3f} {row['graph_of_peak']:7.0%} {ideal:>8s}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--sweep", action="store_true", help="also time Triton launch options per store")
    parser.add_argument("--skip-accuracy", action="store_true", help="time only (no error table at 4096 tokens)")
    parser.add_argument("--cases", default="", help="only the stores whose label contains one of these (comma-separated)")
    parser.add_argument("--sweep-only", default="", help="only the sweep, for these stores (comma-separated specs, "
                        "or '|'-separated when a spec has knobs)")
    parser.add_argument("--launches", default="", help="the sweep's launch options as warps,stages[,maxnreg] or "
                        "key=value pairs (num_warps=1,num_stages=3,COLUMNS=0), separated by ';' (default: eleven)")
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head (8 KV heads; 4: Llama-3.1-8B)")
    parser.add_argument("--splits", default="default,8,16,32", help="the sweep's pages per program, comma-separated "
                        "('default': paged_decode's own choice)")
    args = parser.parse_args()
    if args.sweep_only:
        launches = tuple(parse_launch(item) for item in args.launches.split(";")) if args.launches else LAUNCHES
        specs = args.sweep_only.split("|" if "|" in args.sweep_only else ",")
        splits = tuple(None if item == "default" else int(item) for item in args.splits.split(","))
        rows = sweep(args.batch, args.tokens, tuple(specs), launches, splits, args.group)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "triton": triton.__version__, "batch": args.batch, "tokens": args.tokens,
                                        "group": args.group, "sweep": rows}, indent=1))
        return
    peak = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "kvfold": kvfold.__version__, "copy_bandwidth_tb_s": peak / 1e12,
              "shape": f"batch {args.batch}, {args.tokens} tokens, {8 * args.group} q heads / 8 KV heads, "
                       "head_dim 128, one layer",
              "accuracy": [] if args.skip_accuracy else accuracy(),
              "speed": speed(args.batch, args.tokens, peak, tuple(filter(None, args.cases.split(","))), args.group),
              "sweep": []}
    args.out.write_text(json.dumps(result, indent=1))  # written before the sweep, which a time limit may cut
    report(result)
    if args.sweep:
        result["sweep"] = sweep(args.batch, args.tokens, group=args.group)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
