"""xKV decoding: attention in the latent space (`GroupLatents.layer_latents`) vs rebuilding the prompt's K and V
from the latents at every step (what `chunks()` without `latent` gives), side by side on the embedded model (CPU).

Each mode generates --new greedy tokens after a --length-token random prompt, alternating modes --repeats times;
reported: decode seconds per token (median over repeats) and whether both modes chose the same tokens.
Writes OUT.json and OUT.md.

    python benchmarks/xkv_decode.py --out benchmarks/results/xkv_decode_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold import reading  # noqa: E402
from kvfold.decoding import generate_batch  # noqa: E402
from kvfold.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="xkv")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--new", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model()
    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (args.length,)).tolist()
    latent_chunks = reading.StoreReader.chunks
    modes = {"latent": latent_chunks, "rebuilt": lambda self, latent=False: latent_chunks(self, False)}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    tokens: dict[str, list[int]] = {}
    generate_batch(model, [prompt[:256]], method=args.method, max_new_tokens=2, fast=False)  # warm-up
    try:
        for _ in range(args.repeats):
            for mode, chunks in modes.items():
                reading.StoreReader.chunks = chunks
                out = generate_batch(model, [prompt], method=args.method, max_new_tokens=args.new, fast=False)
                seconds[mode].append(out.decode_seconds / args.new)
                tokens[mode] = out.outputs[0].tokens
    finally:
        reading.StoreReader.chunks = latent_chunks
    rows = {mode: statistics.median(s) * 1e3 for mode, s in seconds.items()}
    report = {"machine": platform.machine(), "torch": torch.__version__, "kvfold": kvfold.__version__,
              "threads": args.threads, "method": args.method, "length": args.length, "new_tokens": args.new,
              "ms_per_token": rows, "all_ms_per_token": {m: [x * 1e3 for x in s] for m, s in seconds.items()},
              "same_tokens": tokens["latent"] == tokens["rebuilt"]}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# xKV decoding: latent-space attention vs rebuilt K/V ({platform.machine()}, torch {torch.__version__}, "
             f"{args.threads} threads)", "",
             f"embedded SmolLM2-135M, `{args.method}`, {args.length}-token random prompt, {args.new} greedy tokens, "
             f"median of {args.repeats} alternating runs (`benchmarks/xkv_decode.py`).", "",
             "| mode | ms per token |", "|---|---|"]
    lines += [f"| {mode} | {ms:.1f} |" for mode, ms in rows.items()]
    lines += ["", f"Speed-up {rows['rebuilt'] / rows['latent']:.2f}×; same tokens: {report['same_tokens']}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
