"""Where a chunked prefill's time goes: wall clock against GPU kernel time, then the kernels and the host-side
operators that take it, for each method side by side.

A quantizer's chunked prefill on the H200 took 3.5× `none`'s (`fast_decode_h200_all.md`: 40.8 against 11.7 s at
4 × 32k in chunks of 4096). This runs the same prefill on a randomly initialised model of a real shape with fewer
layers (time per layer is what matters), under `torch.profiler` with CPU and CUDA activities, after one warm-up
prefill. "host-bound" is wall time the GPU spent idle: launches, Python and synchronisations.

    python benchmarks/profile_prefill.py --methods none,kivi:4 --layers 4 --out profile_prefill_h200.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kvfold.api import make_cache, prefill, use_kvfold_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunked_prefill import CONFIGS, random_model  # noqa: E402


def totals(prof, device: bool, top: int) -> tuple[float, list[dict]]:
    """(total ms, the `top` entries by self time): CUDA kernels (device) or CPU operators (host)."""
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == kind:
            entry = by_name[event.name]
            entry[0] += (event.device_time_total if device else event.self_cpu_time_total) / 1e3
            entry[1] += 1
    total = sum(ms for ms, _ in by_name.values())
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return total, [dict(name=name[:100], ms=round(ms, 2), calls=count) for name, (ms, count) in ranked]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="none,kivi:4")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = random_model(args.config, args.layers)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.length),
                        generator=torch.Generator().manual_seed(1)).cuda()

    def run() -> float:
        with use_kvfold_attention(model):
            cache = make_cache(model, spec)
            torch.cuda.synchronize()
            start = time.perf_counter()
            prefill(model, cache, ids, chunk=args.chunk)
            torch.cuda.synchronize()
            return time.perf_counter() - start

    results, lines = [], []
    for spec in args.methods.split(","):
        run()  # warm-up: Triton compiles, the allocator grows
        plain = run()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            profiled = run()
        gpu_ms, kernels = totals(prof, True, args.top)
        _, host = totals(prof, False, args.top)
        row = dict(method=spec, wall_s=round(plain, 3), profiled_wall_s=round(profiled, 3),
                   gpu_kernel_s=round(gpu_ms / 1e3, 3), host_bound_s=round(max(0.0, profiled - gpu_ms / 1e3), 3),
                   kernels=kernels, host_operators=host)
        results.append(row)
        lines += [f"## `{spec}`: wall {plain:.2f} s ({profiled:.2f} s profiled), GPU kernels {gpu_ms / 1e3:.2f} s, "
                  f"host-bound {row['host_bound_s']:.2f} s", "", "| kernel | ms | calls |", "|---|---|---|"]
        lines += [f"| `{k['name'][:80]}` | {k['ms']} | {k['calls']} |" for k in kernels]
        lines += ["", "| host operator (self CPU) | ms | calls |", "|---|---|---|"]
        lines += [f"| `{k['name'][:80]}` | {k['ms']} | {k['calls']} |" for k in host] + [""]
    head = [f"# Chunked prefill, profiled ({torch.cuda.get_device_name()}, torch {torch.__version__})", "",
            f"{args.config} shape with {args.layers} layers (random init, bf16), batch {args.batch}, {args.length}-token "
            f"prompts in chunks of {args.chunk}.", ""]
    print("\n".join(head + lines))
    if args.out:
        meta = dict(benchmark="profile_prefill", device=torch.cuda.get_device_name(), torch=torch.__version__,
                    config=args.config, layers=args.layers, batch=args.batch, length=args.length, chunk=args.chunk)
        args.out.write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
