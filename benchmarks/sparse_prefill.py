"""Sparse prefill (`kernels.sparse`: FlexPrefill's pattern + a block-sparse Triton kernel) vs SDPA, in one run.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), batch 1, causal, bf16, at each
--lengths. The attention has the structure sparse prefill relies on (a few key columns every query reads, a local
diagonal, noise elsewhere), built synthetically; or (--captured FILE, from `benchmarks/capture_qkv.py`) the embedded
model's own post-RoPE Q/K/V of one layer at 8k tokens, tiled to each length (its shapes: 9 query heads, 3 KV
heads, head_dim 64). Timed: the pattern choice (`flexprefill_mask`, or with --estimate int4|int8 the low-bit
estimate `lowbit_mask` through its Triton kernels), the kernel, and their sum, against
`scaled_dot_product_attention`, and the pattern's parts (codes, estimate, pick; the kernel's block lists);
accuracy: the cosine similarity to SDPA's output and the recall (attention mass inside the selected blocks) of 1024
seeded sampled query rows per head. Issue 7's aim: >= 3x at 128k with recall >= 0.95. Writes OUT.json and OUT.md.

    python benchmarks/sparse_prefill.py --out benchmarks/results/sparse_prefill_h200
On the CPU (`--device cpu`, TRITON_INTERPRET=1, small --lengths) it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.kernels.pattern import flexprefill_mask, lowbit_mask  # noqa: E402
from kvfold.kernels.sparse import sparse_prefill, sparse_prefill_flagged  # noqa: E402
from prefill_kernel import timer  # noqa: E402  (beside this script)


def structured(length: int, device: str, dtype: torch.dtype, q_heads=32, kv_heads=8, dim=128):
    torch.manual_seed(0)
    direction = torch.randn(dim, device=device)
    q = torch.randn(1, q_heads, length, dim, device=device) + 1.5 * direction
    k = torch.randn(1, kv_heads, length, dim, device=device) * 0.5
    columns = torch.randint(0, length, (8,), device=device)
    k[:, :, columns] += 1.5 * direction
    k[:, :, :4] += 1.5 * direction  # sinks
    v = torch.randn(1, kv_heads, length, dim, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def captured(path: Path, length: int, device: str, dtype: torch.dtype):
    """The captured layer's q, k, v repeated along the tokens to `length`."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    reps = -(-length // tensors["query"].shape[2])
    return tuple(tensors[name].to(device, dtype).repeat(1, 1, reps, 1)[:, :, :length].contiguous()
                 for name in ("query", "key", "value"))


def recall(q, k, mask, scale, block, rows=1024, chunk=256) -> float:
    """Mean attention mass inside the selected blocks, over `rows` query positions per head, the same ones for
    every run of a length (seeded: runs of one mask agree; 256 unseeded rows moved it by 0.005 between runs),
    `chunk` rows at a time."""
    length, group = q.shape[2], q.shape[1] // k.shape[1]
    picked = torch.randint(0, length, (rows,), generator=torch.Generator().manual_seed(length)).to(q.device)
    keys = torch.arange(length, device=q.device)
    keys_t = k.float().repeat_interleave(group, 1).transpose(-1, -2)
    total = 0.0
    for at in picked.split(chunk):
        scores = (q[:, :, at].float() @ keys_t) * scale
        weights = torch.softmax(scores.masked_fill(keys[None, :] > at[:, None], float("-inf")), dim=-1)
        total += (weights * mask[:, :, at // block][..., keys // block]).sum(-1).sum(-1).mean().item()
    return total / rows


def case(q, k, v, gamma: float, tau: float, block: int, time_ms, estimate: str = "pooled", sample: int = 8,
         reduce: str = "sum") -> dict:
    length, scale = q.shape[2], q.shape[-1] ** -0.5
    lists = None
    if estimate == "pooled":
        pattern = lambda: flexprefill_mask(q, k, scale, gamma, tau, block)  # noqa: E731
        mask, aware = pattern()
    else:  # the low-bit estimate's masses by its Triton kernels (interpreted on the CPU); the pick writes the lists
        pattern = lambda: lowbit_mask(q, k, scale, gamma, block, int(estimate[3:]), sample, True, reduce,  # noqa: E731
                                      lists=True)
        (mask, lists), aware = pattern(), None
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)  # noqa: E731
    kernel = lambda: sparse_prefill(q, k, v, mask, scale, block, lists=lists)  # noqa: E731
    sdpa_ms, kernel_ms, pattern_ms = time_ms(sdpa), time_ms(kernel), time_ms(pattern)
    out, base = kernel(), sdpa().float()
    causal_blocks = mask.shape[-1] * (mask.shape[-1] + 1) / 2
    return {"length": length, "sdpa_ms": sdpa_ms, "kernel_ms": kernel_ms, "pattern_ms": pattern_ms,
            "speedup": sdpa_ms / (kernel_ms + pattern_ms), "kernel_speedup": sdpa_ms / kernel_ms,
            "density": mask.sum().item() / (mask.shape[0] * mask.shape[1] * causal_blocks),
            "query_aware_heads": None if aware is None else int(aware.sum()),
            "recall": recall(q, k, mask, scale, block),
            "cosine": F.cosine_similarity(out.flatten(), base.flatten(), dim=0).item(),
            "pattern_parts_ms": pattern_parts(q, k, mask, estimate, block, sample, reduce, gamma, time_ms),
            "selection": (mask, lists)}  # main's, not the report's


def pattern_parts(q, k, mask, estimate: str, block: int, sample: int, reduce: str, gamma: float, time_ms) -> dict:
    """Where the low-bit pattern's time goes: the codes (`lowbit_codes_triton`; PyTorch's `lowbit_operands` beside
    them), the estimate kernel with them, the pick kernel alone and writing the sparse kernel's block lists; and
    those lists made from the mask (`block_lists`, inside the sparse kernel's time with FlexPrefill's pattern)."""
    from kvfold.kernels.sparse import block_lists

    parts = {"lists": time_ms(lambda: block_lists(mask))}
    if estimate != "pooled":
        from kvfold.kernels.estimate import lowbit_block_mass_triton, lowbit_codes_triton, pick_blocks_triton
        from kvfold.kernels.pattern import lowbit_operands

        bits, scale = int(estimate[3:]), q.shape[-1] ** -0.5
        mass = lowbit_block_mass_triton(q, k, scale, block, bits, sample, reduce)
        parts = {"codes": time_ms(lambda: lowbit_codes_triton(q, k, block, bits, sample, bits == 4)),
                 "codes (torch)": time_ms(lambda: lowbit_operands(q, k, block, bits, sample, reduce)),
                 "codes+estimate": time_ms(lambda: lowbit_block_mass_triton(q, k, scale, block, bits, sample, reduce)),
                 "pick": time_ms(lambda: pick_blocks_triton(mass, gamma)),
                 "pick+lists": time_ms(lambda: pick_blocks_triton(mass, gamma, lists=True)), **parts}
    return parts


def parse_launches(spec: str) -> list[dict]:
    """';'-separated launches 'NAME=INT,...' -> their option dicts."""
    return [{name: int(value) for name, _, value in (item.partition("=") for item in launch.split(","))}
            for launch in filter(None, spec.split(";"))]


def named_launches(spec: str) -> dict[str, dict]:
    """';'-separated launches 'NAME=INT,...' -> each launch's text to its option dict."""
    return dict(zip(filter(None, spec.split(";")), parse_launches(spec)))


def time_launches(spec: str, device: str, label: str, run) -> dict:
    """ms of `run(launch options)` at each ';'-separated launch of `spec` ('NAME=INT,...')."""
    times = {}
    for launch, options in named_launches(spec).items():
        times[launch] = timer(device)(lambda: run(options))
        print(f"  {label} at {launch}: {times[launch]:.2f} ms", flush=True)
    return times


def estimate_launches(q, k, args) -> dict:
    """The low-bit estimate's kernel alone (`lowbit_block_mass_triton`), ms at each launch of --estimate-launches
    (at --estimate's bits; 4 with the pooled estimate)."""
    from kvfold.kernels.estimate import lowbit_block_mass_triton

    bits = int(args.estimate[3:]) if args.estimate != "pooled" else 4
    return time_launches(args.estimate_launches, args.device, "estimate kernel", lambda options: (
        lowbit_block_mass_triton(q, k, q.shape[-1] ** -0.5, args.block, bits, args.rows, args.reduce, launch=options)))


def pick_launches(q, k, args) -> dict:
    """The pick with its block lists alone (`pick_blocks_triton(lists=True)`) over the low-bit masses, ms at each
    launch of --pick-launches (ARITY, num_warps)."""
    from kvfold.kernels.estimate import lowbit_block_mass_triton, pick_blocks_triton

    mass = lowbit_block_mass_triton(q, k, q.shape[-1] ** -0.5, args.block, int(args.estimate[3:]), args.rows,
                                    args.reduce)
    return time_launches(args.pick_launches, args.device, "pick+lists", lambda options: (
        pick_blocks_triton(mass, args.gamma, lists=True, launch=options)))


def kernel_launches(q, k, v, mask, lists, args) -> tuple[dict, dict]:
    """The block-sparse kernel alone (`sparse_prefill`) over the run's mask (and lists, as timed in the run), ms at
    each launch of --kernel-launches; and per launch the max |difference| of its output to the default launch's
    and (ANCHORED) the share of query blocks redone with the running maximum."""
    scale = q.shape[-1] ** -0.5
    times = time_launches(args.kernel_launches, args.device, "sparse kernel", lambda options: (
        sparse_prefill(q, k, v, mask, scale, args.block, launch=options, lists=lists)))
    default = sparse_prefill(q, k, v, mask, scale, args.block, lists=lists).float()
    checks = {}
    for launch, options in named_launches(args.kernel_launches).items():
        out, redone = sparse_prefill_flagged(q, k, v, mask, scale, args.block, launch=options, lists=lists)
        checks[launch] = {"max_abs_diff": (out.float() - default).abs().max().item(),
                          "redone": None if redone is None else redone.float().mean().item()}
        print(f"  sparse kernel at {launch}: max |diff| to the default {checks[launch]['max_abs_diff']:.2e}"
              + ("" if redone is None else f", query blocks redone {checks[launch]['redone']:.4f}"), flush=True)
    return times, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--estimate", default="pooled", choices=["pooled", "int4", "int8"],
                        help="the pattern's estimate: FlexPrefill's pooled one, or the low-bit (SALE-style) one")
    parser.add_argument("--rows", type=int, default=8, help="the low-bit estimate's sampled queries per block")
    parser.add_argument("--reduce", default="sum", choices=["sum", "max"], help="the low-bit estimate's block weight")
    parser.add_argument("--estimate-launches", default="",
                        help="also time the low-bit estimate's kernel alone at each of these ';'-separated launches "
                             "(e.g. 'num_warps=4,num_stages=3;num_warps=8,num_stages=2')")
    parser.add_argument("--kernel-launches", default="",
                        help="also time the sparse kernel alone at each of these ';'-separated launches "
                             "(e.g. 'ANCHORED=0;ANCHORED=1;LAZY=1;num_warps=8,num_stages=2'; ANCHORED is the default)")
    parser.add_argument("--pick-launches", default="",
                        help="--estimate int4/int8: also time the pick with its lists alone at each of these "
                             "';'-separated launches (e.g. 'ARITY=2;ARITY=4;ARITY=4,num_warps=4')")
    parser.add_argument("--captured", type=Path, help="a capture_qkv.py file: its real Q/K/V, tiled")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        q, k, v = (structured(length, args.device, dtype) if args.captured is None
                   else captured(args.captured, length, args.device, dtype))
        rows.append(case(q, k, v, args.gamma, args.tau, args.block, timer(args.device), args.estimate, args.rows,
                         args.reduce))
        mask, lists = rows[-1].pop("selection")
        if args.estimate_launches:
            rows[-1]["estimate_kernel_ms"] = estimate_launches(q, k, args)
        if args.pick_launches and args.estimate != "pooled":
            rows[-1]["pick_ms"] = pick_launches(q, k, args)
        if args.kernel_launches:
            rows[-1]["sparse_kernel_ms"], rows[-1]["sparse_kernel_checks"] = kernel_launches(q, k, v, mask, lists,
                                                                                             args)
        r = rows[-1]
        print(f"{length:7d} tokens: SDPA {r['sdpa_ms']:.2f} ms, sparse {r['kernel_ms']:.2f} + pattern "
              f"{r['pattern_ms']:.2f} ms ({r['speedup']:.2f}x), density {r['density']:.2f}, recall {r['recall']:.3f}, "
              f"cosine {r['cosine']:.4f}; " + ", ".join(f"{name} {ms:.2f}" for name, ms in
                                                       r["pattern_parts_ms"].items()) + " ms", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter: not a speed)"
    report = {"device": device, "torch": torch.__version__, "kvfold": kvfold.__version__, "dtype": str(dtype),
              "gamma": args.gamma, "tau": args.tau, "block": args.block, "estimate": args.estimate,
              "estimate_rows": args.rows if args.estimate != "pooled" else None,
              "estimate_reduce": args.reduce if args.estimate != "pooled" else None,
              "shape": ("batch 1, 32 q heads / 8 KV heads, head_dim 128, causal, synthetic column + diagonal pattern"
                        if args.captured is None else f"batch 1, 9 q heads / 3 KV heads, head_dim 64, causal, "
                        f"SmolLM2 layer Q/K/V captured at 8k ({args.captured.name}), tiled"),
              "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    pattern = ("FlexPrefill pattern" if args.estimate == "pooled" else
               f"low-bit pattern ({args.estimate}, {args.rows} sampled queries per block, {args.reduce})")
    lines = [f"# Sparse prefill ({pattern} + block-sparse kernel) vs SDPA ({device})", "",
             f"{report['shape']}; gamma {args.gamma}" + (f", tau {args.tau}" if args.estimate == "pooled" else "")
             + f", blocks of {args.block}; "
             "`benchmarks/sparse_prefill.py`. Density: selected share of the causal blocks; recall: attention mass "
             "inside them (1024 seeded sampled rows per head).", "",
             "| tokens | SDPA ms | kernel ms | pattern ms | × SDPA (both) | kernel × SDPA | density | recall | cosine |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['sdpa_ms']:.2f} | {r['kernel_ms']:.2f} | {r['pattern_ms']:.2f} | {r['speedup']:.2f} "
              f"| {r['kernel_speedup']:.2f} | {r['density']:.2f} | {r['recall']:.3f} | {r['cosine']:.4f} |" for r in rows]
    parts = list(rows[0]["pattern_parts_ms"])
    lines += ["", "Parts, ms (`pattern_parts`: the pattern's codes (PyTorch's beside them), estimate kernel, pick, and "
              "pick with the block lists the sparse kernel walks (the pattern's time has them); `lists`: the same lists "
              "made from the mask, as FlexPrefill's pattern has them made inside the kernel's time):", "",
              "| tokens | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    lines += [f"| {r['length']} | " + " | ".join(f"{r['pattern_parts_ms'][name]:.2f}" for name in parts) + " |"
              for r in rows]
    for key, title in (("estimate_kernel_ms", "The low-bit estimate's kernel alone (`lowbit_block_mass_triton`)"),
                       ("pick_ms", "The pick with its block lists alone (`pick_blocks_triton(lists=True)`)"),
                       ("sparse_kernel_ms", "The sparse kernel alone (`sparse_prefill`, the run's mask)")):
        launched = [r for r in rows if r.get(key)]
        if launched:
            launches = list(launched[0][key])
            lines += ["", f"{title}, ms per launch:", "",
                      "| tokens | " + " | ".join(f"`{launch}`" for launch in launches) + " |",
                      "|---|" + "---|" * len(launches)]
            lines += [f"| {r['length']} | " + " | ".join(f"{r[key][launch]:.2f}" for launch in launches) + " |"
                      for r in launched]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
