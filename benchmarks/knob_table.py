"""A method with and without one knob, on the same bench samples: score per (method, task) from two `kvfold bench`
result files, the second run's methods carrying the knob (e.g. `,detect=20`). The samples must match (same seed,
lengths and sample count): each question of the second run is paired with the same question (sample hash and
index) of the first, and one the first run lacks is an error, not a silent gap; a run in progress is compared on
what it holds.
Prints Markdown (header and table; the reading is written by hand under it):

    python benchmarks/knob_table.py --base benchmarks/results/standard/results.jsonl \\
        --other benchmarks/results/detect_standard/results.jsonl --knob detect=20
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def load(path: str, knob: str) -> dict[tuple[str, str], list[dict]]:
    """(method without the knob, task) -> rows."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for line in open(path):
        row = json.loads(line)
        method = row["method"].replace(f",{knob}", "").replace(f":{knob}", "")
        cells[(method, row["task"])].append(row)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--other", required=True)
    parser.add_argument("--knob", required=True, help="what the other run's methods add, e.g. detect=20")
    parser.add_argument("--command", default="", help="the other run's bench command, for the header")
    args = parser.parse_args()
    base, other = load(args.base, args.knob), load(args.other, args.knob)
    first = next(iter(other.values()))[0]
    out = [f"# `{args.knob}` on and off, same samples ({first['model']}, {first['device_name']})", "",
           f"- torch {first['torch']} · transformers {first['transformers']} · kvfold {first['kvfold']}",
           f"- without: `{args.base}`; with: `{args.other}`" + (f" (`{args.command}`)" if args.command else ""),
           "- score: mean over answered questions (multiturn: contexts × 4 questions); Δ: with − without", "",
           f"| method | task | without {args.knob} | with {args.knob} | Δ |", "|---|---|---|---|---|"]
    totals = defaultdict(list)
    for (method, task), rows in sorted(other.items()):
        reference = {(r["sample_hash"], r["question"]): r for r in base.get((method, task), [])}
        missing = [(r["sample_hash"], r["question"]) for r in rows if (r["sample_hash"], r["question"]) not in reference]
        if missing:
            raise SystemExit(f"{method} {task}: the first run lacks the samples {missing}")
        reference = [reference[(r["sample_hash"], r["question"])] for r in rows]
        without, with_knob = (statistics.mean(r["score"] for r in rs) for rs in (reference, rows))
        totals["without"].append(without)
        totals["with"].append(with_knob)
        out.append(f"| {method} | {task} | {without:.2f} (n={len(reference)}) | {with_knob:.2f} (n={len(rows)}) | "
                   f"{with_knob - without:+.2f} |")
    out.append(f"| mean of the rows | | {statistics.mean(totals['without']):.3f} | {statistics.mean(totals['with']):.3f} | "
               f"{statistics.mean(totals['with']) - statistics.mean(totals['without']):+.3f} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
