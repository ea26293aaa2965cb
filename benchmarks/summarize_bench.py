"""A Markdown pivot of a `kvfold bench` results.jsonl: mean score per method × ratio × task, KV held vs
uncompressed, and the best method per ratio (until `kvfold report` lands).

    python benchmarks/summarize_bench.py runs/x/results.jsonl > runs/x/summary.md
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = []
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{number}: unreadable line skipped", file=sys.stderr)
    tasks = sorted({r["task"] for r in rows})
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["method"], r["ratio"])].append(r)
    first = rows[0]
    print(f"# kvfold bench: {first['model']} · lengths {sorted({r['length'] for r in rows})} · "
          f"{first['device_name']} · torch {first['torch']} · transformers {first['transformers']}\n")
    print("| method | ratio | " + " | ".join(tasks) + " | mean | KV held / uncompressed |")
    print("|---|---|" + "---|" * (len(tasks) + 2))
    best: dict[object, tuple[float, str]] = {}
    for (method, ratio), group in sorted(cells.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        by_task = [statistics.mean(r["score"] for r in group if r["task"] == t) if any(r["task"] == t for r in group)
                   else float("nan") for t in tasks]
        mean = statistics.mean(r["score"] for r in group)
        held = statistics.mean(r["kv_bytes"] / r["kv_bytes_uncompressed"] for r in group)
        print(f"| {method} | {ratio if ratio is not None else '—'} | " + " | ".join(f"{s:.2f}" for s in by_task)
              + f" | {mean:.2f} | {held:.0%} |")
        if ratio is not None and mean > best.get(ratio, (0.0, "no method scores above 0"))[0]:
            best[ratio] = (mean, method)
        elif ratio is not None:
            best.setdefault(ratio, (0.0, "no method scores above 0"))
    samples = len({(r["task"], r["sample"]) for r in rows})
    print(f"\n{len(rows)} answers; {samples} task samples. Best method per ratio (mean over tasks): "
          + "; ".join(f"{ratio}: {method} ({score:.2f})" if score > 0 else f"{ratio}: {method}"
                     for ratio, (score, method) in sorted(best.items())))


if __name__ == "__main__":
    main(sys.argv[1])
