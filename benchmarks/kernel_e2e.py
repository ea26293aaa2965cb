"""End to end on a GPU: greedy generation through the Triton decode kernel vs through the PyTorch reference.

A randomly initialised model with the Llama-3.1-8B config (bf16; weights do not travel to the GPU machine and
neither path depends on them) generates from the same prompt with each method, once with `KVFOLD_KERNELS=triton`
and once with `KVFOLD_KERNELS=reference`. The two paths compute the same attention in a different order (bf16
dots and split-K merges in the kernel, float32 chunks in the reference), so tokens agree until a near-tie flips;
the script reports the common prefix of the greedy tokens and the first-step logits' largest difference.

    python benchmarks/kernel_e2e.py --length 4096 --new 32 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunked_prefill import CONFIGS  # noqa: E402


def generate(model, ids, spec: str, kernels: str, new: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    os.environ["KVFOLD_KERNELS"] = kernels
    with kvfold.compress(model, spec):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        torch.cuda.synchronize()
    return out.sequences[0, ids.shape[1]:].cpu(), out.logits[1][0].float().cpu(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--methods", default="none,kivi:4,kivi:2,snapkv:0.75@adakv,snapkv:0.75@adakv+kivi:4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    config = LlamaConfig(**CONFIGS["llama-3.1-8b"], attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(10, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(1)).cuda()
    rows = []
    # Baseline for the size of bf16 differences: transformers' own SDPA + DynamicCache vs kvfold's reference.
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref_tokens, ref_logits, _ = generate(model, ids, "none", "reference", args.new)
    plain_tokens = plain.sequences[0, ids.shape[1]:].cpu()
    rows.append({"method": "none: transformers SDPA+DynamicCache vs kvfold reference",
                 "common_prefix": int((plain_tokens == ref_tokens).long().cumprod(0).sum()), "new_tokens": args.new,
                 "second_step_logits_max_abs_diff": float((plain.logits[1][0].float().cpu() - ref_logits).abs().max()),
                 "logit_scale": float(ref_logits.abs().max()), "generate_seconds_kernel": None,
                 "generate_seconds_reference": None})
    print(json.dumps(rows[-1]), flush=True)
    for spec in args.methods.split(","):
        kernel_tokens, kernel_logits, kernel_s = generate(model, ids, spec, "triton", args.new)
        ref_tokens, ref_logits, ref_s = generate(model, ids, spec, "reference", args.new)
        same = int((kernel_tokens == ref_tokens).long().cumprod(0).sum())
        rows.append({"method": spec, "common_prefix": same, "new_tokens": args.new,
                     "second_step_logits_max_abs_diff": float((kernel_logits - ref_logits).abs().max()),
                     "logit_scale": float(ref_logits.abs().max()),
                     "generate_seconds_kernel": round(kernel_s, 2), "generate_seconds_reference": round(ref_s, 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "kernel_e2e", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "config": "llama-3.1-8b (random init, bf16)",
              "prompt_tokens": args.length, "rows": rows}
    lines = [f"# Greedy generation: Triton decode kernel vs reference ({result['gpu']}, torch {result['torch']})", "",
             f"Random-init Llama-3.1-8B shapes, bf16, prompt {args.length} tokens, {args.new} new tokens. The second "
             "step is the first decode step that reads the store.", "",
             "| method | same greedy tokens (common prefix) | 2nd-step logits max abs diff (of max abs) | generate s: kernel / reference |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['common_prefix']}/{r['new_tokens']} | "
                     f"{r['second_step_logits_max_abs_diff']:.3g} ({r['logit_scale']:.3g}) | "
                     f"{r['generate_seconds_kernel']} / {r['generate_seconds_reference']} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
