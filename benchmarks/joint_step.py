"""Cost of one continuous-batching decode step (`kvfold.joint.JointCache`) by batch size, on the embedded model.

B caches are each prefilled with a random prompt of --prompt tokens; then a one-token forward for all B together is
timed (median of --steps after one warm-up). The per-request cost falls with B as far as the weights' matrix
products are shared; each row's attention over its own compressed store is not batched, so it adds per row.
Writes OUT.json and OUT.md.

    python benchmarks/joint_step.py --out benchmarks/results/joint_step_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.api import prefill, use_kvfold_attention  # noqa: E402
from kvfold.cache import KVFoldCache  # noqa: E402
from kvfold.joint import JointCache  # noqa: E402
from kvfold.models import cache_keyword, load_model  # noqa: E402


def step_ms(model, caches: list[KVFoldCache], steps: int) -> float:
    keyword, times = cache_keyword(model), []
    for _ in range(steps + 1):
        joint = JointCache(caches)
        ids = torch.full((len(caches), 1), 42, device=model.device)
        started = time.perf_counter()
        model(input_ids=ids, position_ids=joint.positions(model.device), use_cache=True, **{keyword: joint})
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--methods", default="none,snapkv:0.5+kivi:4")
    parser.add_argument("--prompt", type=int, default=330, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's default)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model()
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode(), use_kvfold_attention(model):
        for method in args.methods.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                caches = [KVFoldCache(model.config, method) for _ in range(batch)]
                for cache in caches:
                    prefill(model, cache, torch.randint(100, 1000, (1, args.prompt), device=model.device))
                ms = step_ms(model, caches, args.steps)
                rows.append({"method": method, "batch": batch, "step_ms": round(ms, 1),
                             "ms_per_request": round(ms / batch, 1)})
                print(f"{method:20s} batch {batch}: {ms:7.1f} ms per step, {ms / batch:6.1f} ms per request",
                      flush=True)
    for row in rows:
        alone = next(r["step_ms"] for r in rows if r["method"] == row["method"] and r["batch"] == 1)
        row["speedup_per_request"] = round(alone / row["ms_per_request"], 2)
    report = {"model": "embedded:SmolLM2-135M-Instruct (float32)", "prompt_tokens": args.prompt,
              "torch_threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "kvfold": kvfold.__version__, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# One continuous-batching decode step by batch size ({report['cpu']}, torch {report['torch']}, "
             f"{args.threads} thread)", "",
             f"{report['model']}; each request's cache prefilled with {args.prompt} random tokens; median of "
             f"{args.steps} one-token steps for all requests together (`benchmarks/joint_step.py`).", "",
             "| method | batch | ms per step | ms per request | per-request speed-up over batch 1 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['batch']} | {r['step_ms']} | {r['ms_per_request']} | {r['speedup_per_request']} |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
