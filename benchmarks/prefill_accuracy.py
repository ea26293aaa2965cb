"""What an approximate prefill costs a real model: the embedded model (SmolLM2-135M, float32, CPU) reads ~8k tokens
of offline prose with each `KVFOLD_PREFILL` choice (exact SDPA, FlexPrefill at several gammas, int8 scores with
16-bit or float8 P·V), then scores the next --eval tokens teacher-forced (`kvfold.perplexity.teacher_forced`, no
compression: only the prefill's attention differs). On the CPU the choices run their references
(`kernels.reference`), the same math the Triton kernels compute on a GPU.

Reported per choice, averaged over --texts texts: the continuation's NLL (nats/token) and its change against exact
attention, top-1 accuracy, and the prefill's wall time here (a reference's time, not a kernel's). Writes OUT.json
and OUT.md.

    python benchmarks/prefill_accuracy.py --out benchmarks/results/prefill_accuracy_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.bench.haystack import build_haystack  # noqa: E402
from kvfold.models import load_model  # noqa: E402
from kvfold.perplexity import teacher_forced  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8000, help="context + continuation")
    parser.add_argument("--eval", type=int, default=256, help="continuation tokens scored")
    parser.add_argument("--texts", type=int, default=3, help="texts (haystack seeds 0..N-1)")
    parser.add_argument("--choices", help="';'-separated KVFOLD_PREFILL values (a choice's knobs take commas)",
                        default="sdpa;sparse:gamma=0.95;sparse:gamma=0.9;sparse:gamma=0.8;int8;int8:pv=fp8")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model()
    texts = [build_haystack(tokenizer, args.tokens, seed) for seed in range(args.texts)]
    rows = []
    for choice in args.choices.split(";"):
        os.environ["KVFOLD_PREFILL"] = choice
        runs = [teacher_forced(model, tokenizer, text, eval_tokens=args.eval) for text in texts]
        rows.append({"choice": choice, "nll": [r.nll for r in runs], "accuracy": [r.accuracy for r in runs],
                     "prefill_seconds": [r.prefill_seconds for r in runs], "context_tokens": [r.context_tokens
                                                                                        for r in runs]})
        print(f"{choice:22s} NLL {statistics.mean(rows[-1]['nll']):.4f}, top-1 {statistics.mean(rows[-1]['accuracy']):.3f}, "
              f"prefill {statistics.mean(rows[-1]['prefill_seconds']):.1f} s", flush=True)
    os.environ.pop("KVFOLD_PREFILL")
    exact = next((r for r in rows if r["choice"] == "sdpa"), None)
    for r in rows:
        r["nll_change"] = None if exact is None else [a - b for a, b in zip(r["nll"], exact["nll"])]
    meta = {"model": "SmolLM2-135M-Instruct (embedded, float32, CPU)", "tokens": args.tokens, "eval": args.eval,
            "texts": args.texts, "torch": torch.__version__, "transformers": transformers.__version__,
            "kvfold": kvfold.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# What an approximate prefill costs the embedded model (CPU, references)", "",
             f"{meta['model']}; {args.texts} texts of offline prose (haystack seeds 0..{args.texts - 1}), "
             f"{statistics.mean(exact['context_tokens'] if exact else rows[0]['context_tokens']):.0f} context tokens "
             f"read with each `KVFOLD_PREFILL` choice, then the next {args.eval} tokens scored teacher-forced, no "
             "compression (`benchmarks/prefill_accuracy.py`). The choices run their references on the CPU, the math "
             "the kernels compute on a GPU; prefill seconds are the references' time here, not a speed.", "",
             "| choice | NLL (nats/token) | change vs exact, mean (min, max) | top-1 | prefill s |", "|---|---|---|---|---|"]
    for r in rows:
        change = "" if r["nll_change"] is None else (f"{statistics.mean(r['nll_change']):+.4f} "
                                                     f"({min(r['nll_change']):+.4f}, {max(r['nll_change']):+.4f})")
        lines.append(f"| `{r['choice']}` | {statistics.mean(r['nll']):.4f} | {change} | "
                     f"{statistics.mean(r['accuracy']):.3f} | {statistics.mean(r['prefill_seconds']):.1f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
