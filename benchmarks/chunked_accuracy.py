"""What chunked prefill costs in accuracy: each scorer at one ratio, compressed after a one-pass prefill vs chunked
prefill at several chunk sizes, on needle, multi-key needle and multi-turn (SCBench-style, query-agnostic) tasks,
on the embedded SmolLM2-135M-Instruct (CPU). Plus: how often the model answers a needle at ~8k tokens with a
1k-token KV budget read in 1k chunks.

Each finished (setting, sample) appends one JSON line to `--jsonl`; a rerun skips what is there (resumable).

    python benchmarks/chunked_accuracy.py --jsonl benchmarks/results/chunked_accuracy_cpu.jsonl \
        --out benchmarks/results/chunked_accuracy_cpu.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.bench.tasks import make_samples, score  # noqa: E402


def settings(args) -> list[dict]:
    out = [] if args.skip_none else [
        {"study": "chunk-cost", "task": task, "length": args.length, "method": "none", "chunk": None}
        for task in args.tasks.split(",")]
    for method in methods(args):
        for chunk in [None] + [int(c) for c in args.chunks.split(",")]:
            if chunk is None and ("defer=true" in method or args.skip_one_pass):  # defer: a chunked prefill's knob
                continue
            for task in args.tasks.split(","):
                out.append({"study": "chunk-cost", "task": task, "length": args.length, "method": method,
                            "chunk": chunk})
    for method, chunk in (("none", None), ("snapkv:budget=1024", None), ("snapkv:budget=1024", 1024)):
        if args.long_length:
            out.append({"study": "8k-needle", "task": "niah", "length": args.long_length, "method": method,
                        "chunk": chunk})
    return out


def methods(args) -> list[str]:
    """Each scorer at the ratio, once per `--compose` suffix (e.g. '+kivi:4')."""
    return [f"{scorer}:{args.ratio}{suffix}" for scorer in args.scorers.split(",") for suffix in args.compose.split(";")]


def key(setting: dict, sample: int) -> str:
    return json.dumps([setting["study"], setting["task"], setting["length"], setting["method"], setting["chunk"],
                       sample])


def load_done(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                done[row["key"]] = row
            except (json.JSONDecodeError, KeyError):
                print(f"{path}:{number}: unreadable line skipped (it will be recomputed)", file=sys.stderr)
    return done


def run_one(model, tokenizer, setting: dict, sample) -> dict:
    agnostic = sample.task == "multiturn"
    start = time.perf_counter()
    answers = kvfold.generate(model, tokenizer, context=sample.context, question=list(sample.questions),
                              method=setting["method"], agnostic=agnostic, max_new_tokens=32,
                              prefill_chunk=setting["chunk"])
    scores = [score(sample.task, a.text, want) for a, want in zip(answers, sample.answers)]
    return {"score": statistics.mean(scores), "kv_bytes": max(a.kv_bytes for a in answers),
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorers", default="snapkv,streaming,knorm,h2o")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--compose", default="", help="';'-separated suffixes each scorer also runs with, e.g. "
                        "';+kivi:4;+kivi:4,defer=true' (the empty one: the scorer alone)")
    parser.add_argument("--chunks", default="512,1024,2048")
    parser.add_argument("--tasks", default="niah,multikey,multiturn")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--long-length", type=int, default=8000, help="0 skips the long-needle study")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--skip-none", action="store_true", help="no uncompressed rows (another run has them)")
    parser.add_argument("--skip-one-pass", action="store_true", help="chunked rows only for compressed methods")
    parser.add_argument("--jsonl", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = kvfold.load_model()
    done = load_done(args.jsonl)
    cache: dict[tuple, list] = {}
    todo = settings(args)
    with args.jsonl.open("a") as sink:
        for i, setting in enumerate(todo):
            n = args.samples if setting["study"] == "chunk-cost" else 2 * args.samples
            where = (setting["task"], setting["length"], n)
            if where not in cache:
                cache[where] = make_samples(setting["task"], tokenizer, length=setting["length"], samples=n, seed=0)
            for s, sample in enumerate(cache[where]):
                k = key(setting, s)
                if k in done:
                    continue
                row = {"key": k, **setting, "sample": s, **run_one(model, tokenizer, setting, sample)}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                done[k] = row
                print(f"[{i + 1}/{len(todo)}] {json.dumps(row)}", flush=True)
    report = table(list(done.values()), args)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


def table(rows: list[dict], args) -> str:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["study"], row["method"], row["task"], row["chunk"]), []).append(row)
    lines = ["# Chunked prefill: accuracy cost (embedded SmolLM2-135M-Instruct, CPU)", "",
             f"Ratio {args.ratio} (fraction removed), {args.length}-token contexts, {args.samples} samples per cell; "
             "niah/multikey query-aware (the question repeated after each chunk as the window), multiturn "
             "query-agnostic (4 questions on forks of one compressed context). Score: mean over samples (and turns).",
             "", "| method | task | one pass | " + " | ".join(f"chunk {c}" for c in args.chunks.split(",")) + " |",
             "|---|---|---|" + "---|" * len(args.chunks.split(","))]
    chunks = [None] + [int(c) for c in args.chunks.split(",")]
    for task in args.tasks.split(","):
        got = groups.get(("chunk-cost", "none", task, None), [])
        if got:
            lines.append(f"| none (uncompressed) | {task} | {statistics.mean(r['score'] for r in got):.2f} | "
                         + " | ".join("" for _ in chunks[1:]) + " |")
    for method in methods(args):
        for task in args.tasks.split(","):
            cells = []
            for chunk in chunks:
                got = groups.get(("chunk-cost", method, task, chunk), [])
                cells.append(f"{statistics.mean(r['score'] for r in got):.2f}" if got else "—")
            lines.append(f"| {method} | {task} | " + " | ".join(cells) + " |")
    if not args.long_length:
        return "\n".join(lines)
    lines += ["", f"Needle at ~{args.long_length} tokens with a 1024-token budget per row (snapkv):", ""]
    for method, chunk in (("none", None), ("snapkv:budget=1024", None), ("snapkv:budget=1024", 1024)):
        got = groups.get(("8k-needle", method, "niah", chunk), [])
        if got:
            hits = sum(r["score"] for r in got)
            how = "uncompressed" if method == "none" else "one pass" if chunk is None else f"chunks of {chunk}"
            lines.append(f"- {how}: {hits:.0f}/{len(got)} needles found, KV held "
                         f"{statistics.mean(r['kv_bytes'] for r in got) / 2**20:.1f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
