"""Do the fast decode loop and the normal kvfold path compute the same thing? Teacher-forced, step by step.

Both paths decode the same prompt with the same method; the fast path is fed the normal path's greedy tokens, so
every step's logits can be compared even after a near-tie would have made free greedy decoding diverge. Per
method and step: the largest |logit difference| between the paths, whether the argmax agrees, and the normal
path's margin between its two best logits. `--invariant` reads the store batch-invariantly in both paths
(`paged_decode(batch_invariant=True)`: splits of a fixed token count, merged in order, so a wider page table only
adds empty splits): if the paths store the same tokens, their logits are then equal bit for bit, and any
difference left is a real one, not the split merge's rounding.

    python benchmarks/path_agreement.py --methods "kivi:4;snapkv:0.75,every=64+kivi:4" --invariant --out x.json

`--against reference`: the normal path through the Triton kernels (`KVFOLD_KERNELS=triton`) teacher-forced to the
same path through the PyTorch references (`KVFOLD_KERNELS=reference`; issue 7's end-to-end check). Their math
differs only in rounding (bf16 dot products and split merges against float32 chunks): the steps where the argmax
differs are printed with the reference's top-2 margin, to be read against the largest |Δ logit| of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
import kvfold.decoding  # noqa: E402
import kvfold.kernels.decode as kernel_decode  # noqa: E402
from kvfold.api import make_cache, prefill, use_kvfold_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunked_prefill import CONFIGS, random_model  # noqa: E402
from fast_decode import split_methods  # noqa: E402


class Forced:
    """Stands in for `decoding.choose_tokens`: records each step's logits and returns the forced tokens (or the
    argmax while recording the reference run)."""

    def __init__(self, tokens: list[torch.Tensor] | None) -> None:
        self.tokens, self.logits = tokens, []

    def __call__(self, logits, sampling, generator):
        self.logits.append(logits.float().cpu())
        step = len(self.logits) - 1
        return logits.argmax(-1) if self.tokens is None else self.tokens[step].to(logits.device)


@torch.inference_mode()
def run(model, ids: torch.Tensor, spec: str, new: int, fast: bool, forced: list[torch.Tensor] | None,
        chunk: int | None) -> Forced:
    chooser = Forced(forced)
    original = kvfold.decoding.choose_tokens
    kvfold.decoding.choose_tokens = chooser
    try:
        with use_kvfold_attention(model):
            cache = make_cache(model, spec)
            logits = prefill(model, cache, ids, chunk=chunk)
            kvfold.decoding.decode(model, cache, logits, torch.full((ids.shape[0],), ids.shape[1]), new, fast=fast)
    finally:
        kvfold.decoding.choose_tokens = original
    return chooser


def compare(normal: Forced, fast: Forced) -> dict:
    steps = []
    for step, (a, b) in enumerate(zip(normal.logits, fast.logits)):
        top = a.topk(2, dim=-1).values
        steps.append({"step": step, "max_abs_diff": (a - b).abs().max().item(), "bitwise_equal": torch.equal(a, b),
                      "argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all()),
                      "min_margin": (top[:, 0] - top[:, 1]).min().item()})
    first_diff = next((s["step"] for s in steps if not s["bitwise_equal"]), None)
    first_flip = next((s["step"] for s in steps if not s["argmax_equal"]), None)
    return {"first_bitwise_difference": first_diff, "first_argmax_difference": first_flip,
            "max_abs_diff": max(s["max_abs_diff"] for s in steps), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the embedded model")
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--methods", default="kivi:4;zipcache:4;snapkv:0.75,every=64;snapkv:0.75,every=64+kivi:4")
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--invariant", action="store_true", help="batch-invariant reads in both paths")
    parser.add_argument("--against", default="fast", choices=["fast", "reference"],
                        help="fast: the fast loop vs the normal path; reference: the normal path through the kernels "
                             "vs through the references")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.invariant:
        plain = kernel_decode.paged_decode
        kernel_decode.paged_decode = lambda *a, **k: plain(*a, **{**k, "batch_invariant": True})
    model = random_model(args.config, args.layers) if args.device == "cuda" else kvfold.load_model()[0]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.length), generator=gen).to(args.device)
    results = []
    for spec in split_methods(args.methods):
        if args.against == "reference":
            os.environ["KVFOLD_KERNELS"] = "reference"
        normal = run(model, ids, spec, args.new, False, None, args.prefill_chunk)
        forced = [logits.argmax(-1) for logits in normal.logits]
        if args.against == "reference":
            os.environ["KVFOLD_KERNELS"] = "triton"
        other = run(model, ids, spec, args.new, args.against == "fast", forced, args.prefill_chunk)
        os.environ.pop("KVFOLD_KERNELS", None)
        row = {"method": spec, **compare(normal, other)}
        results.append(row)
        flips = [s["step"] for s in row["steps"] if not s["argmax_equal"]]
        print(f"{spec:36s} first bitwise difference {row['first_bitwise_difference']}, max |Δ| "
              f"{row['max_abs_diff']:.3g}, argmax differs at steps {flips[:8]} of {len(row['steps'])}"
              + "".join(f"\n    step {s['step']}: |Δ| {s['max_abs_diff']:.3g}, margin {s['min_margin']:.3g}"
                        for s in row["steps"] if s["step"] in flips[:4]), flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        args.out.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                        "args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1))
        paths = ("Triton kernels vs PyTorch references (normal path)" if args.against == "reference"
                 else "fast loop vs normal path")
        lines = [f"# Teacher-forced agreement: {paths} ({device}, torch {torch.__version__})", "",
                 f"{args.config if args.device == 'cuda' else 'embedded model'}, batch {args.batch}, {args.length}-token "
                 f"prompts, {args.new} new tokens{', batch-invariant reads' if args.invariant else ''}; "
                 "`benchmarks/path_agreement.py`. Step 0 is the prefill's logits.", "",
                 "| method | first step whose logits differ | largest \\|Δ logit\\| | steps whose argmax differs "
                 "(\\|Δ\\|, reference top-2 margin) |", "|---|---|---|---|"]
        for row in results:
            flips = "; ".join(f"{s['step']}: {s['max_abs_diff']:.3g}, {s['min_margin']:.3g}" for s in row["steps"]
                              if not s["argmax_equal"]) or "none"
            lines.append(f"| `{row['method']}` | {row['first_bitwise_difference']} | {row['max_abs_diff']:.3g} | "
                         f"{flips} |")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
