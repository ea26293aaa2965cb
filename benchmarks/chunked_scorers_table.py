"""A table of chunked prefill vs one pass, computed from `kvfold bench` result files (one pass, then one file per
chunk size), for the rows (method, task) the chunked runs hold ("—" where a run has not reached a row yet). It
prints the header and table of a results folder's summary.md (whose reading is written by hand under it):

    python benchmarks/chunked_scorers_table.py      # chunked_scorers_2k: onepass/ and 512/
    python benchmarks/chunked_scorers_table.py --onepass benchmarks/results/standard/results.jsonl \\
        --chunked 512=benchmarks/results/chunked_standard/512/results.jsonl \\
        --chunked 1024=benchmarks/results/chunked_standard/1024/results.jsonl \\
        --command "kvfold bench --methods ... [--prefill-chunk N]"
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

BASE = "benchmarks/results/chunked_scorers_2k"
OLD_COMMAND = ("kvfold bench --methods snapkv,knorm,expected --ratios 0.25 --tasks niah,multiturn --lengths 2048 "
               "--samples 2 --setting aware --max-new-tokens 24 [--prefill-chunk 512]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onepass", default=f"{BASE}/onepass/results.jsonl")
    parser.add_argument("--chunked", action="append", help="SIZE=results.jsonl (repeatable)")
    parser.add_argument("--command", default=OLD_COMMAND, help="the bench command, for the header")
    args = parser.parse_args()
    chunked = dict(item.split("=", 1) for item in (args.chunked or [f"512={BASE}/512/results.jsonl"]))
    runs = {"one pass": [json.loads(line) for line in open(args.onepass)]}
    runs |= {f"chunks of {size}": [json.loads(line) for line in open(path)]
             for size, path in chunked.items() if Path(path).exists()}
    first = runs["one pass"][0]
    modes = list(runs)
    out = [f"# Chunked prefill vs one pass, per scorer ({first['model']}, {first['device_name']})", "",
           f"- torch {first['torch']} · transformers {first['transformers']} · kvfold {first['kvfold']}",
           f"- `{args.command}`; this table is computed from the runs' `results.jsonl`",
           "- score: mean over answered questions (multiturn: contexts × 4 questions); KV: mean bytes held when the "
           "answer ended; prefill: mean seconds; peak RSS: the process's sampled resident memory (model weights "
           "included; noisy on a shared machine; exact KV peaks are in `chunked_prefill_cpu.md`)", "",
           "| method | task | " + " | ".join(f"score, {m}" for m in modes) + " | KV MiB | "
           + " | ".join(f"prefill s, {m}" for m in modes) + " | " + " | ".join(f"peak RSS MiB, {m}" for m in modes) + " |",
           "|---|---|" + "---|" * (3 * len(modes) + 1)]
    cells = defaultdict(lambda: defaultdict(list))
    for mode, rows in runs.items():
        for row in rows:
            cells[(row["method"], row["task"])][mode].append(row)
    mean = lambda rows, key: statistics.mean(r[key] for r in rows)  # noqa: E731
    chunk_modes = modes[1:]
    for (method, task), by_mode in sorted(cells.items()):
        if not by_mode["one pass"] or not any(by_mode[m] for m in chunk_modes):
            continue  # a row no chunked run holds
        cell = lambda m, text: text(by_mode[m]) if by_mode[m] else "—"  # noqa: E731  (a run still in progress)
        scores = " | ".join(cell(m, lambda rs: f"{mean(rs, 'score'):.2f} (n={len(rs)})") for m in modes)
        kv = " / ".join(cell(m, lambda rs: f"{mean(rs, 'kv_bytes') / 2**20:.1f}") for m in modes)
        prefill = " | ".join(cell(m, lambda rs: f"{mean(rs, 'prefill_seconds'):.1f}") for m in modes)
        peaks = " | ".join(cell(m, lambda rs: f"{max(r['peak_memory_bytes'] for r in rs) / 2**20:.0f}") for m in modes)
        out.append(f"| {method} | {task} | {scores} | {kv} | {prefill} | {peaks} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
