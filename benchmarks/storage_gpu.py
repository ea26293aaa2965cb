"""Packed storage on the GPU, side by side in one run: bytes the CUDA allocator gives a layer's store vs the store's
own `nbytes()` vs the same KV in bf16, per method, at 8k tokens.

One attention layer of Llama-3.1-8B's shape (8 KV heads, head_dim 128), batch 4, random bf16 K/V, stored through
the layer's own path (`_append_rows`: eviction-free, so every token is held). The allocator reading is
`torch.cuda.memory_allocated()` after the store is built minus before (its caching allocator rounds blocks, so it
may exceed `nbytes()` slightly); K/V inputs are allocated before the first reading.

    python benchmarks/storage_gpu.py --out benchmarks/results/storage_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.compressor import Compressor  # noqa: E402
from kvfold.layer import KVFoldLayer  # noqa: E402

SPECS = ("none", "kivi:4", "kivi:2", "kivi:2,sink=64", "fp8", "fp8:scale=page", "kv4:4", "kv4:2", "zipcache:4")


def measure(spec: str, keys: torch.Tensor, values: torch.Tensor) -> dict:
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer = KVFoldLayer(Compressor.parse(spec))
    layer.lazy_initialization(keys, values)
    tokens = keys.shape[2]
    layer.seen = tokens
    layer._append_rows(keys, values, torch.arange(tokens, device=keys.device),
                       torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device))
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated() - before
    nbytes = sum(pool.nbytes() for pool in layer.pools())  # device bytes; page tables live on the host
    bf16 = 2 * keys.numel() * 2
    del layer
    return {"spec": spec, "allocated": allocated, "nbytes": nbytes, "bf16": bf16,
            "allocated_vs_bf16": allocated / bf16, "nbytes_vs_bf16": nbytes / bf16}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    keys = torch.randn(4, 8, args.tokens, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    rows = [measure(spec, keys, values) for spec in SPECS]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kvfold": kvfold.__version__,
              "shape": f"one layer, batch 4, 8 KV heads, head_dim 128, {args.tokens} tokens", "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    lines = [f"# Packed storage on the GPU: allocator vs nbytes() ({result['device']})", "",
             f"- {result['shape']}; torch {result['torch']}; kvfold {result['kvfold']}; script: "
             "`benchmarks/storage_gpu.py`", "",
             "| method | allocator MiB | nbytes() MiB | bf16 MiB | allocator / bf16 | nbytes() / bf16 |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['spec']} | {row['allocated'] / 2**20:.2f} | {row['nbytes'] / 2**20:.2f} | "
                     f"{row['bf16'] / 2**20:.2f} | {row['allocated_vs_bf16']:.1%} | {row['nbytes_vs_bf16']:.1%} |")
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
