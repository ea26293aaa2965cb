"""The core cache on a CUDA GPU: exactness, layers split across devices, and the reference decode path's speed.

No kernels yet: decoding reads the paged store through the PyTorch reference (kernels/reference.py), so this is
the baseline the Triton kernels (issue: GPU kernels) and the fast decode loop must beat.

    python benchmarks/core_gpu_check.py --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.api import use_kvfold_attention  # noqa: E402


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=1024,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def exactness(device: str) -> dict:
    model = tiny().to(device)
    torch.manual_seed(1)
    ids = torch.randint(1, 256, (2, 120), device=device)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    settings = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, attention_mask=mask, **settings)
    out = {}
    for spec in ("none", "snapkv:0.5", "adakv:0.5", "kivi:4,group=16,residual=32", "snapkv:0.5+kivi:2"):
        with kvfold.compress(model, spec) as session:
            got = model.generate(ids, attention_mask=mask, **settings)
        out[spec] = {"same_tokens": bool(torch.equal(got, reference)), "nbytes": session.cache.nbytes()}
    return out


def split_devices() -> dict:
    """Layers 0-1 run on the GPU and layer 2 on the CPU: each layer's pools live on that layer's device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny().to("cuda")
    model.model.layers[2].to("cpu")
    add_hook_to_module(model.model.layers[2], AlignDevicesHook(execution_device=torch.device("cpu"),
                                                               io_same_device=True))
    torch.manual_seed(2)
    ids = torch.randint(1, 256, (1, 90), device="cuda")
    settings = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    out = {}
    for spec in ("none", "snapkv:0.5+kivi:4,group=16,residual=16"):
        with kvfold.compress(model, spec) as session:
            got = model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        devices = [sorted({str(pool.device) for pool in layer.pools()}) for layer in session.cache.layers]
        out[spec] = {"same_tokens_as_dynamic_cache": bool(torch.equal(got.cpu(), reference.cpu())),
                     "pool_devices_per_layer": devices}
    return out


def decode_speed(batch: int, context: int, steps: int) -> dict:
    """A randomly initialised Llama-3.2-1B-shaped model in bf16: ms per decode step and peak memory."""
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (batch, context), device="cuda")
    rows = {}
    for spec in ("dynamic", "none", "snapkv:0.5", "kivi:4", "kivi:2", "snapkv:0.5+kivi:4"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            dynamic = spec == "dynamic"
            with contextlib.nullcontext() if dynamic else use_kvfold_attention(model):
                cache = DynamicCache(config=config) if dynamic else kvfold.make_cache(model, spec)
                torch.cuda.synchronize()
                start = time.perf_counter()
                logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
                torch.cuda.synchronize()
                prefill = time.perf_counter() - start
                token = logits[:, -1:].argmax(-1)
                times = []
                for step in range(steps):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    logits = model(token, past_key_values=cache,
                                   position_ids=torch.full((batch, 1), context + step, device="cuda")).logits
                    token = logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
        times.sort()
        rows[spec] = {"prefill_s": prefill, "decode_ms_median": 1000 * times[len(times) // 2],
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "kv_bytes": cache.nbytes() if spec != "dynamic" else
                      sum(l.keys.numel() * 2 * l.keys.element_size() for l in cache.layers)}
        del cache
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "kvfold": kvfold.__version__}
    result["exactness_cuda"] = exactness("cuda")
    print(json.dumps(result["exactness_cuda"], indent=1), flush=True)
    result["split_devices"] = split_devices()
    print(json.dumps(result["split_devices"]), flush=True)
    result["decode"] = {"shape": f"Llama-3.2-1B config, random bf16, batch {args.batch}, context {args.context}",
                        "rows": decode_speed(args.batch, args.context, args.steps)}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'method':22s} {'prefill s':>9s} {'decode ms':>9s} {'peak GiB':>8s} {'KV MiB':>8s}")
    for spec, row in result["decode"]["rows"].items():
        print(f"{spec:22s} {row['prefill_s']:9.2f} {row['decode_ms_median']:9.1f} {row['peak_gib']:8.2f} "
              f"{row['kv_bytes'] / 2**20:8.1f}")


if __name__ == "__main__":
    main()
