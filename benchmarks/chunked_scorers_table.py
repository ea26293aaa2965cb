"""The table of benchmarks/results/chunked_scorers_2k/summary.md, computed from the two `kvfold bench` runs in that
folder (one pass and --prefill-chunk 512).

    python benchmarks/chunked_scorers_table.py > benchmarks/results/chunked_scorers_2k/summary.md
"""

import json
import statistics
from collections import defaultdict

base = "benchmarks/results/chunked_scorers_2k"
rows = {mode: [json.loads(l) for l in open(f"{base}/{mode}/results.jsonl")] for mode in ("onepass", "512")}
first = rows["onepass"][0]
out = [f"# Chunked prefill vs one pass, per scorer ({first['model']}, {first['device_name']})", "",
       f"- torch {first['torch']} · transformers {first['transformers']} · kvfold {first['kvfold']} · git {first['git_revision'][:7]}",
       "- `kvfold bench --methods snapkv,knorm,expected --ratios 0.25 --tasks niah,multiturn --lengths 2048 --samples 2 "
       "--setting aware --max-new-tokens 24 [--prefill-chunk 512]`; rows in `onepass/` and `512/` (this table is computed from them)",
       "- score: mean over answered questions (niah: 2 samples; multiturn: 2 contexts × 4 questions); KV: mean bytes held when the answer ended; "
       "peak RSS: the process's sampled resident memory over the answer (model weights included; noisy on a shared machine; exact KV peaks are in `chunked_prefill_cpu.md`)", "",
       "| method | task | one pass | chunks of 512 | KV one pass (MiB) | KV chunked (MiB) | prefill s one pass | prefill s chunked | peak RSS one pass (MiB) | peak RSS chunked (MiB) |",
       "|---|---|---|---|---|---|---|---|---|---|"]
cells = defaultdict(lambda: defaultdict(list))
for mode, rs in rows.items():
    for r in rs:
        cells[(r["method"], r["task"])][mode].append(r)
for (method, task), modes in sorted(cells.items()):
    a, b = modes["onepass"], modes["512"]
    mean = lambda rs, k: statistics.mean(r[k] for r in rs)
    out.append(f"| {method} | {task} | {mean(a,'score'):.2f} (n={len(a)}) | {mean(b,'score'):.2f} (n={len(b)}) | "
               f"{mean(a,'kv_bytes')/2**20:.1f} | {mean(b,'kv_bytes')/2**20:.1f} | {mean(a,'prefill_seconds'):.1f} | {mean(b,'prefill_seconds'):.1f} | "
               f"{max(r['peak_memory_bytes'] for r in a)/2**20:.0f} | {max(r['peak_memory_bytes'] for r in b)/2**20:.0f} |")
print("\n".join(out))
