"""A turn of a few tokens (a speculative draft, a short user turn) over a long compressed cache: the decode kernel
reading the store for all n queries with the turn's own tokens merged in (`reading.attend`'s few-token branch)
against SDPA over the full bf16 KV (causal over the turn: a boolean mask, as transformers passes it, and the
lower-right causal bias that lets the flash kernel run) and against SDPA over the gathered store: one flash call
(`reading.sdpa_after_store`, the branch a longer turn takes on CUDA) and the masked blocks it replaced
(`reading.sdpa_over_store`), side by side in one run.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), one layer, batch 8, 32k tokens stored.

    python benchmarks/few_token_decode.py --out few_token_decode.json          # on a GPU
    TRITON_INTERPRET=1 python benchmarks/few_token_decode.py --smoke           # tiny shapes on the CPU: runs the code
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from decode_kernel import store  # noqa: E402
from kvfold.kernels.decode import new_tokens_partials, paged_decode  # noqa: E402
from kvfold.kernels.reference import KVChunk  # noqa: E402
from kvfold.reading import sdpa_after_store, sdpa_over_store  # noqa: E402


def timer(device: str):
    """Median ms of a call: replayed from a CUDA graph (as the fast loop runs the kernel), or eagerly with CUDA
    events (`graph=False`: the gathered store syncs with the host); the CPU smoke run: one call's wall clock."""
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        def run(call, graph: bool = True) -> float:
            if graph:
                return do_bench_cudagraph(call, rep=200, return_mode="median")
            return do_bench(call, warmup=25, rep=200, return_mode="median")
        return run

    def once(call, graph: bool = True) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3
    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--turns", default="1,2,4", help="tokens per turn (GQA 4: up to 4 fit 16 query heads)")
    parser.add_argument("--methods", default="none,kivi:4")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    batch, tokens, kv_heads, group, dim = (1, 128, 2, 4, 64) if args.smoke else (args.batch, args.tokens, 8, 4, 128)
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter's bfloat16 arithmetic is broken
    rows, scale, bench = batch * kv_heads, dim ** -0.5, timer(device)
    torch.manual_seed(0)
    keys = torch.randn(batch, kv_heads, tokens, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    results = []
    for n in (int(x) for x in args.turns.split(",")):
        q = torch.randn(rows, group, n, dim, device=device, dtype=dtype)
        new_k = torch.randn(rows, n, dim, device=device, dtype=dtype)
        new_v = torch.randn_like(new_k)
        positions = torch.arange(tokens, tokens + n, device=device)
        key_positions = positions.view(1, n).expand(rows, n).contiguous()
        valid = torch.ones(rows, n, dtype=torch.bool, device=device)
        # SDPA over the full cache plus the turn, causal over the turn
        full_k = torch.cat([keys, new_k.view(batch, kv_heads, n, dim)], dim=2)
        full_v = torch.cat([values, new_v.view(batch, kv_heads, n, dim)], dim=2)
        sdpa_q = q.view(batch, kv_heads, group, n, dim).reshape(batch, kv_heads * group, n, dim)
        mask = torch.ones(n, tokens + n, dtype=torch.bool, device=device).tril(tokens)
        sdpa = lambda: F.scaled_dot_product_attention(sdpa_q, full_k, full_v, attn_mask=mask, scale=scale,  # noqa: E731
                                                      enable_gqa=True)
        sdpa_ms = bench(sdpa)
        results.append({"turn": n, "path": "SDPA, full bf16 KV", "ms": sdpa_ms, "vs_sdpa": 1.0})
        print(f"n={n} SDPA full KV: {sdpa_ms:.3f} ms", flush=True)
        if n > 1:  # the same with a lower-right causal bias, the GQA group's heads as views of one KV head
            bias = causal_lower_right(n, tokens + n)
            bias = bias._materialize(device) if device == "cpu" else bias
            shape = (rows, group, tokens + n, dim)
            flash_k, flash_v = (t.view(rows, 1, tokens + n, dim).expand(shape) for t in (full_k, full_v))
            flash = lambda: F.scaled_dot_product_attention(q, flash_k, flash_v, attn_mask=bias, scale=scale)  # noqa: E731
            ms = bench(flash)
            results.append({"turn": n, "path": "SDPA, full bf16 KV, lower-right causal bias", "ms": ms,
                            "vs_sdpa": sdpa_ms / ms})
            print(f"n={n} SDPA full KV, lower-right causal bias: {ms:.3f} ms ({sdpa_ms / ms:.2f}x SDPA)", flush=True)
        for spec in args.methods.split(","):
            layer = store(spec, keys, values) if not args.smoke else store(spec, keys, values, page_size=16)
            parts = layer.kernel_parts()

            def kernel():
                also = new_tokens_partials(q, positions, new_k, new_v, valid, key_positions, scale)
                return paged_decode(q.reshape(rows, group * n, dim), parts, positions[-1:], scale, out_dtype=dtype,
                                    also=also)

            chunk = KVChunk(new_k, new_v, key_positions, valid)
            blocks = lambda: sdpa_over_store(q, positions, [*layer.chunks(), chunk], scale, None)  # noqa: E731
            one_call = lambda: sdpa_after_store(q, layer.chunks(), chunk, scale, layer.stored_slots())  # noqa: E731
            reference = blocks().float()
            err = ((kernel().float().view_as(reference) - reference).norm() / reference.norm()).item()
            one_call_err = ((one_call().float() - reference).norm() / reference.norm()).item()
            print(f"n={n} {spec:8s} one flash call vs the masked blocks: rel. err {one_call_err:.1e}", flush=True)
            for path, call in (("kernel + turn merged", kernel), ("SDPA over the gathered store, one call", one_call),
                               ("SDPA over the gathered store, masked blocks", blocks)):
                ms = bench(call, graph=call is kernel)
                results.append({"turn": n, "store": spec, "path": path, "ms": ms, "vs_sdpa": sdpa_ms / ms,
                                "rel_err_vs_gathered": err if path.startswith("kernel") else 0.0})
                print(f"n={n} {spec:8s} {path:44s} {ms:.3f} ms ({sdpa_ms / ms:.2f}x SDPA), kernel rel. err {err:.1e}",
                      flush=True)
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "torch": torch.__version__,
                "shape": f"batch {batch}, {tokens} tokens, {kv_heads * group} q heads / {kv_heads} KV heads, head_dim "
                         f"{dim}, one layer", "results": results}
        args.out.write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
