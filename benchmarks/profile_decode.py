"""Where a fast decode step's GPU time goes: kernel times per step by kind, beside each kind's roofline share.

Runs kvfold's fast loop (in-place pages, the Triton decode kernel) on a randomly initialised model of a real shape
(default Llama-3.1-8B, bf16, batch 4, 32k-token prompts) under `torch.profiler`, without CUDA graphs so that every
kernel is recorded by name (a graph replays the same kernels back to back: its step time is about their sum plus
launch gaps, which the `graph ms/step` line measures in the same run). Kernels are grouped into matrix products,
decode attention, the split merge, page writes, and the rest (norms, RoPE, activations, copies). The profiled call
includes the loop's one-time preparation (pool growth: a fill and a copy per pool), spread over the steps.

    python benchmarks/profile_decode.py --method none --out benchmarks/results/profile_decode_h200.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kvfold.api import make_cache, prefill, use_kvfold_attention  # noqa: E402
from kvfold.decoding import decode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunked_prefill import CONFIGS  # noqa: E402
from fast_decode import copy_bandwidth  # noqa: E402

KINDS = [("matrix products", r"gemm|gemv|cutlass|xmma|nvjet|splitk|cublas"),
         ("decode attention", r"pages_kernel|paged"),
         ("split merge", r"combine"),
         ("page writes", r"index_put|scatter|write_next|index_copy|write_token"),
         ("other", r".")]


def kind_of(name: str) -> str:
    return next(kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS))
    parser.add_argument("--method", default="none")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=20, help="kernels listed by name")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[args.config], attn_implementation="sdpa")).eval()
    torch.set_default_dtype(torch.float32)
    bandwidth = copy_bandwidth()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.length),
                        generator=torch.Generator().manual_seed(1)).cuda()
    positions = torch.full((args.batch,), args.length)

    def run(graphs: bool, profiler=None):
        with use_kvfold_attention(model):
            cache = make_cache(model, args.method)
            logits = prefill(model, cache, ids)
            torch.cuda.synchronize()
            if profiler is not None:
                profiler.start()
            out = decode(model, cache, logits, positions, args.steps + 1, fast=True, cuda_graphs=graphs)
            torch.cuda.synchronize()
            if profiler is not None:
                profiler.stop()
            return out, cache.nbytes()

    graph_out, kv_bytes = run(True)
    graph_ms = 1e3 * statistics.median(graph_out.step_seconds[2:])
    prof = profile(activities=[ProfilerActivity.CUDA])
    eager_out, _ = run(False, prof)
    eager_ms = 1e3 * statistics.median(eager_out.step_seconds[2:])
    steps = args.steps  # decode(n) runs n - 1 model steps
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name[event.name]
            entry[0] += event.device_time_total / 1e3 / steps  # ms per step
            entry[1] += 1 / steps
    by_kind = collections.Counter()
    for name, (ms, _) in by_name.items():
        by_kind[kind_of(name)] += ms
    kernel_ms = sum(by_kind.values())
    roofline = {"matrix products": weights / bandwidth * 1e3, "decode attention": kv_bytes / bandwidth * 1e3}
    kinds = [dict(kind=kind, ms=round(by_kind[kind], 3), share=round(by_kind[kind] / kernel_ms, 3),
                  roofline_ms=round(roofline[kind], 3) if kind in roofline else None)
             for kind, _ in KINDS]
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:args.top]
    result = dict(benchmark="profile_decode", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  model=f"{args.config} (random init, bf16)", method=args.method, batch=args.batch,
                  prompt_tokens=args.length, steps=steps, weights_bytes=weights, kv_bytes=kv_bytes,
                  copy_bandwidth_GBps=round(bandwidth / 1e9, 1), graph_ms_per_step=round(graph_ms, 3),
                  eager_ms_per_step=round(eager_ms, 3), kernel_ms_per_step=round(kernel_ms, 3),
                  roofline_ms=round((weights + kv_bytes) / bandwidth * 1e3, 3), kinds=kinds,
                  kernels=[dict(name=name[:120], ms=round(ms, 4), launches=round(count, 1))
                           for name, (ms, count) in top])
    lines = [f"# One fast decode step, kernel by kernel ({result['device']}, torch {torch.__version__})", "",
             f"{result['model']}, `{args.method}`, batch {args.batch}, {args.length}-token prompts; "
             f"{steps} profiled steps (eager, so kernels have names). Copy bandwidth {bandwidth / 1e9:.0f} GB/s.", "",
             f"- graph ms/step {graph_ms:.3f}; eager ms/step {eager_ms:.3f}; kernel time per step {kernel_ms:.3f} ms; "
             f"roofline {result['roofline_ms']} ms (weights {weights / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} GB)", "",
             "| kind | ms/step | share | roofline ms |", "|---|---|---|---|"]
    lines += [f"| {k['kind']} | {k['ms']} | {k['share']:.0%} | {k['roofline_ms'] or '—'} |" for k in kinds]
    lines += ["", "| kernel | ms/step | launches/step |", "|---|---|---|"]
    lines += [f"| `{k['name'][:90]}` | {k['ms']} | {k['launches']} |" for k in result["kernels"]]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
