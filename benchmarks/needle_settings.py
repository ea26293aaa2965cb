"""Needle-in-a-haystack accuracy of eviction methods, query-aware vs query-agnostic, on the embedded model (CPU).

Writes benchmarks/results/needle_settings_<device>.json and .md. Accuracy on this 135M model is low for
attention-scored eviction (see the core issue); the point is the side-by-side of the two settings.

    .venv/bin/python benchmarks/needle_settings.py [--length 2000] [--samples 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console

import kvfold
from kvfold.demo import expand_specs, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--methods", default="none,streaming,snapkv,adakv")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    console = Console()
    model, tokenizer = kvfold.load_model()
    compressors = expand_specs(args.methods.split(","), [float(r) for r in args.ratios.split(",")])
    results = []
    for agnostic in (False, True):
        start = time.perf_counter()
        rows = run_demo(model, tokenizer, compressors, length=args.length, samples=args.samples,
                        agnostic=agnostic, console=console)
        console.print(f"[dim]{time.perf_counter() - start:.0f} s[/dim]")
        for row in rows:
            results.append({"method": row.spec, "setting": "query-agnostic" if agnostic else "query-aware",
                            "accuracy": statistics.mean(row.scores), "found": row.scores,
                            "kv_bytes_mean": statistics.mean(row.kv_bytes),
                            "prefill_s_mean": statistics.mean(row.prefill),
                            "decode_tok_s_mean": statistics.mean(row.decode_tps) if row.decode_tps else None})
    device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "kvfold": kvfold.__version__, "model": "SmolLM2-135M-Instruct (embedded, float32)",
            "task": f"niah, {args.length} tokens, {args.samples} needles at depths 10-90%, greedy, 24 new tokens"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "needle_settings_cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    baseline = {r["setting"]: r["kv_bytes_mean"] for r in results if r["method"] == "none"}
    lines = ["# Needle in a haystack: query-aware vs query-agnostic", "", *(f"- {k}: {v}" for k, v in meta.items()),
             "", "| method | setting | found | KV held vs none | prefill s | decode tok/s |", "|---|---|---|---|---|---|"]
    for r in results:
        share = r["kv_bytes_mean"] / baseline[r["setting"]]
        found = f"{sum(r['found']):.0f}/{len(r['found'])}"
        tps = f"{r['decode_tok_s_mean']:.1f}" if r["decode_tok_s_mean"] else "—"
        lines.append(f"| {r['method']} | {r['setting']} | {found} | {share:.0%} | {r['prefill_s_mean']:.2f} | {tps} |")
    (args.out / "needle_settings_cpu.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
