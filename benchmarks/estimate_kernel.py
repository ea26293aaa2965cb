"""The sparse prefill's low-bit estimate kernel alone (`kernels.estimate.lowbit_block_mass_triton`, its codes
included), timed at each --lengths beside the same function from other revisions of the file (--before, e.g. made
with `git show REV:src/kvfold/kernels/estimate.py > benchmarks/captured/estimate_REV.py`) and at each of
--launches, in one run on one device; each one's masses are checked against the current default's (max abs
difference: the same math gives float32 rounding). Input: the embedded model's captured Q/K of one layer tiled to
each length (--captured, from `benchmarks/capture_qkv.py`), else Llama-3.1-8B's attention shapes with a synthetic
pattern. --profile: one call of the current kernel (at the first of --launches) at the longest length and nothing
else (for `ncu`).

    python benchmarks/estimate_kernel.py --captured benchmarks/captured/smollm2_layer15_8k.safetensors \
        --before benchmarks/captured/estimate_34597dc.py --launches "maxnreg=96;SLOTS=264" --out OUT
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.kernels import estimate  # noqa: E402
from prefill_kernel import timer  # noqa: E402  (beside this script)
from sparse_prefill import captured, parse_launches, structured  # noqa: E402


def load_revision(path: Path, index: int):
    """`path` (a copy of kernels/estimate.py) imported inside kvfold.kernels, so its relative imports resolve."""
    name = f"kvfold.kernels._estimate_before_{index}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="65536,131072")
    parser.add_argument("--captured", type=Path, help="a capture_qkv.py file: its real Q/K, tiled")
    parser.add_argument("--before", type=Path, nargs="*", default=[], help="other revisions of kernels/estimate.py")
    parser.add_argument("--launches", default="", help="';'-separated NAME=INT,... launches of the current kernel")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--reduce", default="sum", choices=["sum", "max"])
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="one call at the longest length, nothing timed")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lengths = [int(length) for length in args.lengths.split(",")]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    def inputs(length):
        if args.captured:
            return captured(args.captured, length, args.device, dtype)[:2]
        return structured(length, args.device, dtype)[:2]

    def run(module, q, k, launch=None):
        return module.lowbit_block_mass_triton(q, k, q.shape[-1] ** -0.5, args.block, args.bits, args.rows,
                                               args.reduce, launch=launch)

    if args.profile:  # the first of --launches, if any
        q, k = inputs(max(lengths))
        run(estimate, q, k, (parse_launches(args.launches) or [None])[0])
        torch.cuda.synchronize()
        return
    revisions = [("current", estimate, None)] + [(path.stem, load_revision(path, i), None)
                                                 for i, path in enumerate(args.before)]
    revisions += [(f"current {','.join(f'{n}={v}' for n, v in launch.items())}", estimate, launch)
                  for launch in parse_launches(args.launches)]
    time_ms = timer(args.device)
    results = []
    for length in lengths:
        q, k = inputs(length)
        want = run(estimate, q, k)
        for label, module, launch in revisions:
            try:
                ms = time_ms(lambda: run(module, q, k, launch))
                error = (run(module, q, k, launch) - want).abs().max().item()
            except Exception as failure:  # noqa: BLE001 - a launch the device refuses is a result, not a crash
                ms, error = None, f"{type(failure).__name__}: {str(failure)[:120]}"
            results.append({"length": length, "kernel": label, "ms": ms, "max_abs_diff": error})
            print(f"{length:7d} {label:40s} " + (f"{ms:7.2f} ms, max |diff| {error:.2e}" if ms else error), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shapes = (f"batch 1, {'the captured layer (' + args.captured.name + ') tiled' if args.captured else 'Llama-3.1-8B shapes, synthetic'}"
              f", {args.bits}-bit codes, {args.rows} sampled rows per {args.block}-token block, reduce={args.reduce}")
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps({
            "device": device, "torch": torch.__version__, "triton": triton.__version__,
            "kvfold": kvfold.__version__, "shapes": shapes, "default_launch": estimate.ESTIMATE_LAUNCH,
            "results": results}, indent=1))
        table = [f"# Low-bit estimate kernel, codes included ({device})", "", shapes + "; "
                 "`benchmarks/estimate_kernel.py`, median ms (triton's do_bench), max |diff| of the masses to the "
                 "current default's.", "", "| tokens | kernel | ms | max abs diff |", "|---|---|---|---|"]
        table += [f"| {row['length']} | {row['kernel']} | " + (f"{row['ms']:.2f} | {row['max_abs_diff']:.1e} |"
                                                              if row["ms"] else f"failed | {row['max_abs_diff']} |")
                  for row in results]
        args.out.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
