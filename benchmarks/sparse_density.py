"""How sparse is a real model's prefill attention, and how close does FlexPrefill's pattern come to the sparsest
block set with the same recall? Every layer and head of the embedded model (SmolLM2-135M, CPU) at ~8k tokens of
offline prose, exact attention computed head by head.

Per head: the block attention mass M[query block, key block] (each query row's softmax summed over the block's
rows and keys), then
- FlexPrefill (`kernels.pattern.flexprefill_mask` at each of --gammas, --tau, --block): selected share of the causal
  blocks (density) and the mean attention mass of every query row inside the selection (recall);
- the low-bit estimate (`kernels.pattern.lowbit_mask`, SALE-style: --rows sampled queries per block scored at
  --bits against every key, then per query block the fewest key blocks holding gamma of the estimate);
- the oracle: per query block, the fewest key blocks that hold gamma of that block's mass (the least any selection
  that covers gamma of every query block can read: what a perfect estimate of the pattern would pick).
Every selection keeps the diagonal blocks.
The sparse kernel's time follows density (benchmarks/sparse_prefill.py), so a layer's best speed-up is about
1 / oracle density and FlexPrefill's about 1 / its density. Writes OUT.json and OUT.md.
--captured FILE --length N: one layer's Q/K captured at 8k (`capture_qkv.py`) repeated to N tokens, the input
`sparse_prefill.py` times on the GPU, in place of the model's layers.

    python benchmarks/sparse_density.py --out benchmarks/results/sparse_density_cpu
    python benchmarks/sparse_density.py --captured benchmarks/captured/smollm2_layer15_8k.safetensors \
        --length 32768 --gammas 0.95,0.96,0.97 --out benchmarks/results/sparse_density_cpu_tiled32k
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.bench.haystack import build_haystack  # noqa: E402
from kvfold.inspection.capture import routed_attention  # noqa: E402
from kvfold.kernels.pattern import flexprefill_mask, lowbit_block_mass, pick_blocks  # noqa: E402
from kvfold.models import load_model  # noqa: E402


def capture_all(tokens: int, seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, int]:
    """Post-RoPE (query, key) of every layer for `tokens` tokens of prose; the attention scale; the token count."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, tokenizer = load_model()
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    scale = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query.contiguous(), key.contiguous())
        scale["value"] = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ids = tokenizer(build_haystack(tokenizer, tokens, seed), return_tensors="pt").input_ids
    with torch.inference_mode(), routed_attention(model, "kvfold_density", capture, "_kvfold_density", None):
        model(ids, use_cache=False, logits_to_keep=1)
    return [captured[i] for i in sorted(captured)], scale["value"], ids.shape[1]


def block_mass(query: torch.Tensor, key: torch.Tensor, scale: float, block: int, chunk: int = 1024) -> torch.Tensor:
    """One head's causal attention [tokens, dim] x [tokens, dim] -> [blocks, blocks]: each query row's softmax summed
    over the rows of its query block and the keys of each key block (so query block b's row sums to its row count)."""
    tokens = query.shape[0]
    blocks = -(-tokens // block)
    keys = torch.arange(tokens)
    mass = torch.zeros(blocks, blocks)
    for first in range(0, tokens, chunk):  # query rows a chunk at a time: [chunk, tokens] float32 at most
        rows = torch.arange(first, min(first + chunk, tokens))
        scores = (query[rows].float() @ key.float().T) * scale
        weights = torch.softmax(scores.masked_fill(keys[None, :] > rows[:, None], float("-inf")), dim=-1)
        per_key_block = torch.zeros(len(rows), blocks).index_add_(1, keys // block, weights)
        mass.index_add_(0, rows // block, per_key_block)
    return mass


def layer_rows(query: torch.Tensor, key: torch.Tensor, scale: float, gammas: list[float], tau: float,
               block: int, bits: int, sample: int, reduce: str = "sum") -> list[dict]:
    """Per head and gamma: FlexPrefill's, the low-bit estimate's and the oracle's density and recall (exact block
    masses and the estimate computed once)."""
    group = query.shape[1] // key.shape[1]
    masses = [block_mass(query[0, head], key[0, head // group], scale, block) for head in range(query.shape[1])]
    estimate = lowbit_block_mass(query, key, scale, block, bits, sample, reduce)[0]
    blocks = masses[0].shape[0]
    causal = blocks * (blocks + 1) / 2
    rows = []
    for gamma in gammas:
        mask, aware = flexprefill_mask(query, key, scale, gamma, tau, block)
        lowbit = pick_blocks(estimate, gamma)
        for head, mass in enumerate(masses):
            tokens = mass.sum()
            selections = {"": mask[0, head], "lowbit_": lowbit[head], "oracle_": pick_blocks(mass, gamma)}
            rows.append({"gamma": gamma, "head": head, "query_aware": bool(aware[0, head]), **{
                f"{name}{metric}": value for name, chosen in selections.items() for metric, value in (
                    ("density", chosen.sum().item() / causal), ("recall", ((mass * chosen).sum() / tokens).item()))}})
    return rows


METRICS = ("density", "recall", "lowbit_density", "lowbit_recall", "oracle_density", "oracle_recall")


def summary(heads: list[dict], gamma: float) -> dict:
    chosen = [h for h in heads if h["gamma"] == gamma]
    return {"gamma": gamma, **{name: statistics.mean(h[name] for h in chosen) for name in METRICS},
            "min_recall": min(h["recall"] for h in chosen),
            "lowbit_min_recall": min(h["lowbit_recall"] for h in chosen),
            "query_aware_heads": sum(h["query_aware"] for h in chosen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gammas", default="0.9,0.95", help="comma-separated coverage thresholds")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4, help="the low-bit estimate's bits (4 or 8)")
    parser.add_argument("--rows", type=int, default=8, help="the low-bit estimate's sampled queries per block")
    parser.add_argument("--reduce", default="sum", choices=["sum", "max"], help="the low-bit estimate's block weight")
    parser.add_argument("--layers", help="comma-separated layer indices (default: all)")
    parser.add_argument("--captured", type=Path, help="a capture_qkv.py file: its layer, tiled to --length")
    parser.add_argument("--length", type=int, default=32768, help="with --captured: tokens after tiling")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gammas = [float(g) for g in args.gammas.split(",")]
    start = time.perf_counter()
    if args.captured:
        from sparse_prefill import captured  # beside this script

        query, key, _ = captured(args.captured, args.length, "cpu", torch.float32)
        layers, scale, tokens = [(query, key)], query.shape[-1] ** -0.5, args.length
    else:
        layers, scale, tokens = capture_all(args.tokens, args.seed)
    chosen = [int(i) for i in args.layers.split(",")] if args.layers else range(len(layers))
    results, every_head = [], []
    for index in chosen:
        heads = layer_rows(*layers[index], scale, gammas, args.tau, args.block, args.bits, args.rows, args.reduce)
        every_head += heads
        results.append({"layer": "tiled" if args.captured else index, "heads": heads,
                        "summary": [summary(heads, g) for g in gammas]})
        print(f"layer {results[-1]['layer']}: " + " | ".join(
            f"gamma {r['gamma']}: FlexPrefill density {r['density']:.2f} recall {r['recall']:.3f}, low-bit "
            f"{r['lowbit_density']:.2f} / {r['lowbit_recall']:.3f}, oracle density {r['oracle_density']:.2f}"
            for r in results[-1]["summary"]), flush=True)
    model = "SmolLM2-135M-Instruct (embedded, float32, CPU)"
    if args.captured:
        model += f", one layer captured at 8k ({args.captured.name}) tiled to {tokens} tokens"
    meta = {"model": model, "tokens": tokens, "seed": args.seed,
            "gammas": gammas, "tau": args.tau, "block": args.block,
            "lowbit_bits": args.bits, "lowbit_rows": args.rows, "lowbit_reduce": args.reduce,
            "torch": torch.__version__,
            "kvfold": kvfold.__version__, "seconds": round(time.perf_counter() - start)}
    average = [summary(every_head, g) for g in gammas]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "average": average, "layers": results},
                                                        indent=1))
    lines = [f"# Prefill attention density per layer: FlexPrefill and the low-bit estimate vs the oracle ({tokens} "
             "tokens)", "",
             f"{meta['model']}, " + ("" if args.captured else f"{tokens} tokens of prose (seed {args.seed}), ")
             + f"tau {args.tau}, blocks of {args.block}; "
             "`benchmarks/sparse_density.py`. Density: selected share of the causal blocks; recall: mean attention "
             "mass of every query row inside the selection (all rows, exact attention); low-bit: "
             f"`lowbit_mask` ({args.rows} sampled queries per block, {args.bits}-bit Q and smoothed K, reduce "
             f"{args.reduce}); oracle: per "
             "query block the fewest key blocks holding gamma of its mass (what a perfect estimate of the pattern "
             "would pick). Every selection keeps the diagonal blocks.", "",
             "| layer | " + " | ".join(f"γ {g}: FlexPrefill density / recall | low-bit | oracle"
                                       for g in gammas) + " |",
             "|---|" + "---|---|---|" * len(gammas)]
    cell = lambda r: " | ".join(f"{r[f'{name}density']:.2f} / {r[f'{name}recall']:.3f}"  # noqa: E731
                                for name in ("", "lowbit_", "oracle_"))
    lines += [f"| {r['layer']} | " + " | ".join(cell(x) for x in r["summary"]) + " |" for r in results]
    lines.append("| all heads | " + " | ".join(cell(x) for x in average) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
