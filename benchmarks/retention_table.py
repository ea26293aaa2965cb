"""Share of uncompressed accuracy each method keeps, pooled over several `kvfold bench` runs (e.g. one per seed),
with a paired bootstrap interval: issue 4's measure ("the best method keeps >= 80% of uncompressed accuracy on single
and multi-key needles at ratio 0.5").

    python benchmarks/retention_table.py benchmarks/results/chunks_2k/results.jsonl \\
        benchmarks/results/heldout_2k/seed2/results.jsonl benchmarks/results/heldout_2k/seed3/results.jsonl

Each (run, task, sample) is one unit: its uncompressed score and each method's score on the same sample (same
prompt, so paired). Retention = Σ method / Σ uncompressed over the units; the interval resamples units with
replacement (2000 draws, seeded). A unit whose uncompressed row is missing is an error, not a silent gap. Prints
Markdown; the reading is written by hand under it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict


def without_ratio(method: str) -> str:
    """`snapkv:0.5,chunk=64` -> `snapkv:chunk=64`, `chunkkv:0.5` -> `chunkkv` (the ratio is its own column)."""
    def part(component: str) -> str:
        name, _, knobs = component.partition(":")
        kept = [k for k in knobs.split(",") if k and not k.replace(".", "", 1).isdigit()]
        return name + (":" + ",".join(kept) if kept else "")

    return re.sub(r"[^@+]+", lambda match: part(match.group(0)), method)


def load(paths: list[str], tasks: set[str]) -> tuple[dict, dict]:
    """(method, ratio) -> {unit: score} and the uncompressed {unit: score}; a unit is (run, task, sample)."""
    methods: dict[tuple[str, float], dict] = defaultdict(dict)
    base: dict[tuple, float] = {}
    for run, path in enumerate(paths):
        for line in open(path):
            row = json.loads(line)
            if row["task"] not in tasks:
                continue
            unit = (run, row["task"], row["sample"], row["question"])
            if row["method"] == "none":
                base[unit] = row["score"]
            else:
                methods[(without_ratio(row["method"]), row["ratio"])][unit] = row["score"]
    for (method, ratio), scores in methods.items():
        missing = set(scores) - set(base)
        if missing:
            raise SystemExit(f"{method} at {ratio}: no uncompressed row for {sorted(missing)[:3]}...")
    return methods, base


def retention(scores: dict, base: dict, draws: int = 2000) -> tuple[float, float, float]:
    units = sorted(scores)
    total = sum(base[u] for u in units)
    point = sum(scores[u] for u in units) / total if total else float("nan")
    rng = random.Random(0)
    samples = []
    for _ in range(draws):
        pick = [rng.choice(units) for _ in units]
        denominator = sum(base[u] for u in pick)
        if denominator:
            samples.append(sum(scores[u] for u in pick) / denominator)
    samples.sort()
    return point, samples[int(0.025 * len(samples))], samples[int(0.975 * len(samples)) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.jsonl of each run (one per seed)")
    parser.add_argument("--tasks", default="niah,multikey")
    args = parser.parse_args()
    methods, base = load(args.results, set(args.tasks.split(",")))
    runs = ", ".join(args.results)
    print(f"Runs: {runs}; tasks {args.tasks}; a unit is one (run, task, sample) question.\n")
    print("| method | ratio | units | correct | uncompressed correct | kept share of uncompressed | 95% interval |")
    print("|---|---|---|---|---|---|---|")
    for (method, ratio), scores in sorted(methods.items(), key=lambda item: (item[0][1] or 0, item[0][0])):
        point, low, high = retention(scores, base)
        correct = sum(scores.values())
        reference = sum(base[u] for u in scores)
        print(f"| `{method}` | {ratio} | {len(scores)} | {correct:g} | {reference:g} | {point:.0%} | {low:.0%}–{high:.0%} |")


if __name__ == "__main__":
    main()
