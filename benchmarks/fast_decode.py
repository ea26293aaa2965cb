"""The decode loop end to end: transformers' DynamicCache vs kvfold's fast loop, side by side in one run.

GPU (default): a randomly initialised model with the Llama-3.1-8B config (bf16; weights do not travel to the GPU
machine and speed does not depend on them), batch 4, 32k-token prompts, 64 new tokens, greedy. CPU (`--device
cpu`): the embedded SmolLM2 model. Rows:
- `transformers DynamicCache`: prefill, then one `model(...)` call per token (what `generate` does), SDPA;
- each kvfold method through the fast loop (`kvfold.decoding.decode(fast=True)`: in-place pages, the Triton
  kernel, one CUDA graph per generation), and through the normal kvfold path (`fast=False`) for comparison.
Per row: steady ms per step (median after the first two steps: the first one warms up and captures), tokens/s
over the batch, KV bytes held, peak device memory, the roofline (weights + KV bytes over the measured copy
bandwidth), peak / (weights + KV), a largest-batch estimate at this length from the measured peak per sequence,
and the greedy tokens' common prefix with the normal kvfold path of the same method.

    python benchmarks/fast_decode.py --out benchmarks/results/fast_decode_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.api import make_cache, prefill, use_kvfold_attention  # noqa: E402
from kvfold.decoding import decode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunked_prefill import CONFIGS, PeakRSS, random_model  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read + write counted (the roofline's rate)."""
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) / 1e3)


class Peak:
    """Peak device memory (CUDA allocator) or resident memory (CPU) over a block; `mark()` ends the prefill phase
    (its peak is kept in `prefill`) and starts the decode phase's (`decode`); `value` is the peak of both."""

    def __init__(self, device: str) -> None:
        self.device, self.value, self.prefill, self.decode = device, 0, 0, 0

    def _start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.rss = PeakRSS().__enter__()

    def _stop(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        self.rss.__exit__(None, None, None)
        return self.rss.peak

    def __enter__(self):
        self._start()
        return self

    def mark(self) -> None:
        self.prefill = self._stop()
        self._start()

    def __exit__(self, *exc):
        self.decode = self._stop()
        self.value = max(self.prefill, self.decode)


@torch.inference_mode()
def transformers_row(model, ids: torch.Tensor, new: int, device: str, chunk: int | None) -> dict:
    model.set_attn_implementation("sdpa")
    with Peak(device) as peak:
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        for lo in range(0, ids.shape[1], chunk or ids.shape[1]):
            part = ids[:, lo:lo + (chunk or ids.shape[1])]
            logits = model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1,
                           position_ids=torch.arange(lo, lo + part.shape[1], device=ids.device).expand_as(part)
                           ).logits[:, -1]
        sync(device)
        prefill_s = time.perf_counter() - start
        peak.mark()
        tokens, steps = [], []
        position = torch.full((ids.shape[0], 1), ids.shape[1], device=ids.device)
        for step in range(new):
            token = logits.argmax(-1)
            tokens.append(token.tolist())
            if step == new - 1:
                break
            start = time.perf_counter()
            logits = model(input_ids=token[:, None], position_ids=position, past_key_values=cache,
                           use_cache=True).logits[:, -1]
            logits.argmax(-1).tolist()  # the host waits for the token, as any decode loop must
            steps.append(time.perf_counter() - start)
            position += 1
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return dict(method="transformers DynamicCache", path="transformers", prefill_s=prefill_s, steps=steps,
                kv_bytes=kv, peak=peak.value, decode_peak=peak.decode, tokens=[list(r) for r in zip(*tokens)])


@torch.inference_mode()
def kvfold_row(model, ids: torch.Tensor, spec: str, new: int, fast: bool, graphs: bool, device: str,
               chunk: int | None) -> dict:
    with use_kvfold_attention(model), Peak(device) as peak:
        cache = make_cache(model, spec)
        start = time.perf_counter()
        logits = prefill(model, cache, ids, chunk=chunk)
        sync(device)
        prefill_s = time.perf_counter() - start
        peak.mark()
        out = decode(model, cache, logits, torch.full((ids.shape[0],), ids.shape[1]), new, fast=fast,
                     cuda_graphs=graphs)
        kv = cache.nbytes()
    path = ("fast, CUDA graph" if out.cuda_graph else "fast, eager") if fast else "normal"
    return dict(method=spec, path=path, prefill_s=prefill_s, steps=[0.0] + out.step_seconds, kv_bytes=kv,
                peak=peak.value, decode_peak=peak.decode, tokens=out.tokens)


def summarise(row: dict, batch: int, weights: int, bandwidth: float | None, memory: int | None) -> dict:
    steady = row["steps"][2:] or row["steps"]
    ms = 1e3 * statistics.median(steady)
    roofline = 1e3 * (weights + row["kv_bytes"]) / bandwidth if bandwidth else None
    per_sequence = max(1, row["peak"] - weights) / batch
    summary = {k: v for k, v in row.items() if k not in ("steps", "tokens")}
    summary.update(ms_per_step=round(ms, 3), tokens_per_s=round(batch * 1e3 / ms, 1),
                   first_step_ms=round(1e3 * row["steps"][1], 1) if len(row["steps"]) > 1 else None,
                   decode_peak_over_weights_plus_kv=round(row["decode_peak"] / (weights + row["kv_bytes"]), 3)
                   if bandwidth else None,
                   roofline_ms=round(roofline, 3) if roofline else None,
                   over_roofline=round(ms / roofline, 2) if roofline else None,
                   peak_over_weights_plus_kv=round(row["peak"] / (weights + row["kv_bytes"]), 3) if bandwidth else None,
                   est_max_batch=int((0.97 * memory - weights) // per_sequence) if memory else None,
                   prefill_s=round(row["prefill_s"], 2))
    return summary


def common_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens equal from the start, the shortest over the batch rows."""
    return min(next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
               for ra, rb in zip(a, b))


def split_methods(text: str) -> list[str]:
    """'a,b' or, when specs carry knobs, 'a;b,knob=1'."""
    return [m for m in text.split(";" if ";" in text else ",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS))
    parser.add_argument("--model", default=None, help="CPU: a local model (default: the embedded one)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--methods", default="none,kivi:4,kivi:2,snapkv:0.75,snapkv:0.75+kivi:4",
                        help="comma-separated, or ';'-separated when a spec has knobs (kivi:4,defer=false)")
    parser.add_argument("--normal", default="none,kivi:4,snapkv:0.75+kivi:4",
                        help="methods also run through the normal kvfold path (slow at long contexts)")
    parser.add_argument("--eager", default="none,kivi:4", help="methods also run fast without CUDA graphs")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prefill N tokens at a time (every row, transformers' too): a lower prefill peak")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        model = random_model(args.config)
        bandwidth, memory = copy_bandwidth(), torch.cuda.get_device_properties(0).total_memory
        device_name, described = torch.cuda.get_device_name(), f"{args.config} (random init, bf16)"
    else:
        model, _ = kvfold.load_model(args.model)
        bandwidth = memory = None
        device_name, described = "cpu", "embedded SmolLM2-135M-Instruct (float32)"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.length), generator=gen).to(args.device)
    runs = [("transformers", None, False, False)]
    for spec in split_methods(args.methods):
        runs.append(("kvfold", spec, True, True))
        if spec in split_methods(args.eager) and args.device == "cuda":
            runs.append(("kvfold", spec, True, False))
        if spec in split_methods(args.normal):
            runs.append(("kvfold", spec, False, False))
    rows, normal_tokens = [], {}
    for kind, spec, fast, graphs in runs:
        try:
            row = (transformers_row(model, ids, args.new, args.device, args.prefill_chunk) if kind == "transformers"
                   else kvfold_row(model, ids, spec, args.new, fast, graphs, args.device, args.prefill_chunk))
        except torch.OutOfMemoryError as error:
            row = dict(method=spec, path="fast" if fast else "normal", error=f"out of memory: {error}"[:300])
            print(json.dumps(row), flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
            continue
        if kind == "kvfold" and not fast:
            normal_tokens[spec] = row["tokens"]
        summary = summarise(row, args.batch, weights, bandwidth, memory)
        summary["_tokens"] = row["tokens"]
        rows.append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "_tokens"}), flush=True)
    baseline = next((r for r in rows if r.get("path") == "transformers" and "error" not in r), None)
    for r in rows:
        tokens = r.pop("_tokens", None)
        if tokens is not None and r["method"] in normal_tokens and r["path"] != "normal":
            r["same_greedy_tokens_as_normal"] = f"{common_prefix(tokens, normal_tokens[r['method']])}/{args.new}"
        if baseline and "ms_per_step" in r:
            r["speedup_vs_transformers"] = round(baseline["ms_per_step"] / r["ms_per_step"], 2)
    result = {"benchmark": "fast_decode", "device": device_name, "torch": torch.__version__,
              "transformers": transformers.__version__, "model": described, "batch": args.batch,
              "prompt_tokens": args.length, "new_tokens": args.new, "prefill_chunk": args.prefill_chunk,
              "weights_bytes": weights,
              "copy_bandwidth_GBps": round(bandwidth / 1e9, 1) if bandwidth else None,
              "device_memory_bytes": memory, "rows": rows}
    lines = [f"# Decode loop: transformers vs kvfold fast path ({device_name}, torch {torch.__version__}, "
             f"transformers {transformers.__version__})", "",
             f"{described}, batch {args.batch}, {args.length}-token prompts, {args.new} new tokens, greedy"
             + (f", prefill in chunks of {args.prefill_chunk}" if args.prefill_chunk else "") + ". "
             f"Weights {weights / 1e9:.2f} GB" + (f"; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)."
                                                 if bandwidth else "."), "",
             "ms/step: median after the first two steps (the first warms up and captures the graph: 'first ms'). "
             "Peak: the allocator's (GPU) or resident memory (CPU), prefill and decode; decode peak: during the decode "
             "loop alone. Est. max batch: device memory over the measured peak per sequence, an estimate.", "",
             "| method | path | prefill s | ms/step | tokens/s | × transformers | first ms | KV GB | roofline ms | "
             "× roofline | peak GB | peak / (weights+KV) | decode peak / (weights+KV) | est. max batch | "
             "same tokens as normal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['path']} | {r['error'][:60]} |" + " |" * 12)
            continue
        lines.append(f"| {r['method']} | {r['path']} | {r['prefill_s']} | {r['ms_per_step']} | {r['tokens_per_s']} | "
                     f"{r.get('speedup_vs_transformers', '')} | {r['first_step_ms']} | {r['kv_bytes'] / 1e9:.2f} | "
                     f"{r['roofline_ms'] or '—'} | {r['over_roofline'] or '—'} | {r['peak'] / 1e9:.2f} | "
                     f"{r['peak_over_weights_plus_kv'] or '—'} | {r['decode_peak_over_weights_plus_kv'] or '—'} | "
                     f"{r['est_max_batch'] or '—'} | {r.get('same_greedy_tokens_as_normal', '—')} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
