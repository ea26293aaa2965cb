"""Summarise Nsight Compute's per-instruction stall samples (`ncu --page source --print-source sass --csv`, as
`gpu_session.sh profile` writes them): samples by opcode with their main stall reasons, then the instructions that
hold the most samples. Reads the CSV on any machine.

    python benchmarks/ncu_stalls.py ncu_kivi4_sass.csv --top 20
"""

from __future__ import annotations

import argparse
import collections
import csv
from pathlib import Path

ALL = "Warp Stall Sampling (All Samples)"


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read(path: Path) -> list[dict]:
    rows = list(csv.reader(path.open()))
    header_at = next((i for i, row in enumerate(rows) if row and row[0] == "Address"), None)
    if header_at is None:
        raise SystemExit(f"{path}: no 'Address' header; is this `ncu --page source --csv` output?")
    header = rows[header_at]
    return [dict(zip(header, row)) for row in rows[header_at + 1:] if len(row) == len(header)]


def opcode(source: str) -> str:
    words = source.split()
    if not words:
        return "?"
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    rows = read(args.csv)
    reasons = [name for name in rows[0] if name.startswith("stall_") and "Not Issued" not in name]
    total = sum(number(row[ALL]) for row in rows)
    print(f"{args.csv.name}: {len(rows)} instructions, {total:.0f} stall samples")
    by_reason = collections.Counter()
    by_opcode = collections.defaultdict(collections.Counter)
    for row in rows:
        for reason in reasons:
            by_reason[reason[6:]] += number(row[reason])
            by_opcode[opcode(row["Source"])][reason[6:]] += number(row[reason])
    print("reasons: " + ", ".join(f"{name} {count / total:.0%}" for name, count in by_reason.most_common(8)))
    print("by opcode (share of samples: main reasons)")
    for name, counts in sorted(by_opcode.items(), key=lambda item: -sum(item[1].values()))[:14]:
        share = sum(counts.values()) / total
        print(f"  {name:8s} {share:6.1%}  " + ", ".join(f"{r} {c:.0f}" for r, c in counts.most_common(3)))
    print(f"top {args.top} instructions")
    for row in sorted(rows, key=lambda row: -number(row[ALL]))[:args.top]:
        main_reasons = sorted(((number(row[r]), r[6:]) for r in reasons), reverse=True)[:2]
        print(f"  {number(row[ALL]) / total:6.1%}  {row['Source'][:64]:64s} "
              + ", ".join(f"{r} {c:.0f}" for c, r in main_reasons))


if __name__ == "__main__":
    main()
