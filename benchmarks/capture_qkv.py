"""Capture one layer's real attention inputs for the sparse-prefill benchmark: the embedded model (SmolLM2-135M,
CPU) reads ~8k tokens of offline prose, and the post-RoPE queries, keys and values its attention function
receives at --layer are saved in float16 (safetensors). Weights cannot travel to the GPU machine; this file can
(~16 MB for one layer at 8k), and `benchmarks/sparse_prefill.py --captured FILE` tiles it to long contexts.

    python benchmarks/capture_qkv.py --layer 15 --out benchmarks/captured/smollm2_layer15_8k.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kvfold.bench.haystack import build_haystack  # noqa: E402
from kvfold.inspection.capture import routed_attention  # noqa: E402
from kvfold.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from safetensors.torch import save_file
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, tokenizer = load_model()
    captured: dict[str, torch.Tensor] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == args.layer:
            captured.update(query=query.half().contiguous(), key=key.half().contiguous(),
                            value=value.half().contiguous())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    text = build_haystack(tokenizer, args.tokens, args.seed)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode(), routed_attention(model, "kvfold_capture", capture, "_kvfold_capture", None):
        model(ids, use_cache=False, logits_to_keep=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(captured, str(args.out), metadata={"model": "SmolLM2-135M-Instruct (embedded)", "layer": str(args.layer),
                                                   "tokens": str(ids.shape[1]), "text": "kvfold build_haystack",
                                                   "seed": str(args.seed), "keys": "post-RoPE"})
    print(f"layer {args.layer}: {ids.shape[1]} tokens, q {tuple(captured['query'].shape)}, "
          f"k {tuple(captured['key'].shape)} -> {args.out}")


if __name__ == "__main__":
    main()
