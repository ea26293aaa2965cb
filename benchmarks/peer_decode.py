"""Decode attention over a paged KV cache: kvfold's kernels beside FlashInfer's and SDPA, timed in one run.

Issue 7 asks for a peer kernel where one can travel as a wheel. FlashInfer does (`flashinfer-python`, with its
`apache-tvm-ffi` dependency; the device has no network, so both are carried in `benchmarks/captured/wheels`), and
it compiles its CUDA kernels at first use with the machine's nvcc (a minute or more per variant, not timed).

Shape: batch 8, 32k tokens, 32 query / 8 KV heads, head_dim 128 (Llama-3.1-8B), bf16 queries. Stores:
- SDPA over the full bf16 K/V (the baseline of every ratio);
- bf16 pages of 64 and 16 tokens: kvfold's `none` and FlashInfer's paged KV (its tensor-core and CUDA-core kernels);
- float8 e4m3 pages: kvfold's `fp8` (a scale per token, or per page) and FlashInfer's (one scale per tensor).
Times are `do_bench_cudagraph` medians (each call replayed from a CUDA graph, as a serving loop runs it), beside the
bytes each store reads and the measured copy bandwidth. Each output's relative error against SDPA on the exact
bf16 K/V is printed too (float8 stores differ by their quantization; kvfold's per-token scales are finer).

    OUT=... python benchmarks/peer_decode.py --out $OUT/peer_decode
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernel import copy_bandwidth, referenced_bytes, store  # noqa: E402
from kvfold.kernels.decode import paged_decode  # noqa: E402

FP8_MAX = 448.0  # e4m3


def flashinfer_case(flashinfer, q, k, v, page: int, fp8: bool, tensor_cores: bool, scale: float):
    """A graph-ready FlashInfer decode call over k, v [batch, kv_heads, tokens, dim] laid out as its NHD pages."""
    batch, kv_heads, tokens, dim = k.shape
    per_seq = tokens // page
    pages = torch.stack([x.permute(0, 2, 1, 3).reshape(batch, per_seq, page, kv_heads, dim) for x in (k, v)], dim=2)
    pages = pages.reshape(batch * per_seq, 2, page, kv_heads, dim)
    k_scale = v_scale = None
    if fp8:
        k_scale, v_scale = (float(x.abs().amax()) / FP8_MAX for x in (k, v))
        pages = torch.cat([pages[:, :1] / k_scale, pages[:, 1:] / v_scale], dim=1).to(torch.float8_e4m3fn)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * per_seq
    indices = torch.arange(batch * per_seq, dtype=torch.int32, device="cuda")
    last = torch.full((batch,), page, dtype=torch.int32, device="cuda")
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores, paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
    wrapper.plan(indptr, indices, last, q.shape[1], kv_heads, dim, page, q_data_type=q.dtype,
                 kv_data_type=pages.dtype, sm_scale=scale)
    out = torch.empty_like(q)
    call = lambda: wrapper.run(q, pages, k_scale=k_scale, v_scale=v_scale, out=out)  # noqa: E731
    return call, out, pages.numel() * pages.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    batch, tokens, kv_heads, group, dim = args.batch, args.tokens, 8, 4, 128
    torch.manual_seed(0)
    q = torch.randn(batch, kv_heads * group, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = dim ** -0.5
    peak = copy_bandwidth()
    exact = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True, scale=scale).squeeze(2).float()
    sdpa = lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True, scale=scale)  # noqa: E731
    # Each case is built when its turn comes (call, output buffer or None, bytes read): a FlashInfer variant that
    # fails to compile is one failed row, and only one case's store is held at a time.
    cases = [("SDPA, full bf16 KV", "sdpa", lambda: (sdpa, None, 2 * k.numel() * k.element_size()))]
    rows_q = q.view(batch, kv_heads, group, dim).reshape(batch * kv_heads, group, dim)
    q_pos = torch.full((1,), tokens - 1, dtype=torch.int32, device="cuda")

    def kvfold_case(spec: str, page: int):
        layer = store(spec, k, v, page_size=page)
        parts = layer.kernel_parts()
        return (lambda: paged_decode(rows_q, parts, q_pos, scale, out_dtype=torch.bfloat16), None,
                referenced_bytes(layer))

    for label, spec, page in (("bf16, 64-token pages", "none", 64), ("bf16, 16-token pages", "none", 16),
                              ("fp8, scale/token, 64-token pages", "fp8", 64),
                              ("fp8, scale/page, 64-token pages", "fp8:scale=page", 64),
                              ("fp8, scale/token, 16-token pages", "fp8:group=16", 16)):
        cases.append((label, "kvfold", lambda spec=spec, page=page: kvfold_case(spec, page)))
    try:
        import flashinfer

        version = flashinfer.__version__
    except Exception as error:  # noqa: BLE001  the table says why the peer is missing
        flashinfer, version = None, f"not run: {type(error).__name__}: {str(error)[:200]}"
        print(f"FlashInfer {version}", flush=True)
    for page in (64, 16) if flashinfer else ():
        for fp8 in (False, True):
            for tensor_cores in (True, False):
                label = f"{'fp8, scale/tensor' if fp8 else 'bf16'}, {page}-token pages, " \
                        f"{'tensor cores' if tensor_cores else 'CUDA cores'}"
                cases.append((label, "flashinfer", lambda page=page, fp8=fp8, tc=tensor_cores: flashinfer_case(
                    flashinfer, q, k, v, page, fp8, tc, scale)))
    rows, sdpa_ms = [], None
    for label, kernel, build in cases:
        try:
            call, out, read = build()
            result = call()
            got = (out if out is not None else result).reshape(exact.shape).float()
            error = ((got - exact).norm() / exact.norm()).item()
            eager = do_bench(call, warmup=25, rep=200, return_mode="median")
            graph = do_bench_cudagraph(call, rep=300, return_mode="median")
        except Exception as failure:  # noqa: BLE001  one kernel failing to build or capture leaves the others
            print(f"{label:55s} failed: {type(failure).__name__}: {str(failure)[:200]}", flush=True)
            rows.append(dict(store=label, kernel=kernel, error=f"{type(failure).__name__}: {str(failure)[:300]}"))
            continue
        sdpa_ms = sdpa_ms or graph
        rows.append(dict(store=label, kernel=kernel, graph_ms=graph, eager_ms=eager, vs_sdpa=sdpa_ms / graph,
                         bytes=read, of_copy_bandwidth=read / (graph / 1e3) / peak, rel_err_vs_exact=error))
        print(f"{label:55s} {kernel:10s} graph {graph:.3f} ms  x SDPA {sdpa_ms / graph:.2f}  "
              f"{read / 1e9:.3f} GB  {read / (graph / 1e3) / peak:.0%} of copy  rel err {error:.1e}", flush=True)
    result = dict(benchmark="peer_decode", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, flashinfer=version, batch=batch, tokens=tokens, q_heads=kv_heads * group,
                  kv_heads=kv_heads, head_dim=dim, copy_bandwidth_tb_s=peak / 1e12, rows=rows)
    lines = [f"# Decode attention: kvfold vs FlashInfer vs SDPA ({result['device']})", "",
             f"torch {torch.__version__}, triton {triton.__version__}, FlashInfer {version}; batch {batch}, {tokens} "
             f"tokens, {kv_heads * group} query / {kv_heads} KV heads, head_dim {dim}, bf16 queries; copy bandwidth "
             f"{peak / 1e12:.2f} TB/s (read + write). `python benchmarks/peer_decode.py`; CUDA-graph medians.", "",
             "| store | kernel | graph ms | × SDPA | GB read | of copy bandwidth | rel. error vs exact |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['kernel']} | " + (
            f"failed: {r['error'][:80]} | | | | |" if "error" in r else
            f"{r['graph_ms']:.3f} | {r['vs_sdpa']:.2f} | {r['bytes'] / 1e9:.3f} | {r['of_copy_bandwidth']:.0%} | "
            f"{r['rel_err_vs_exact']:.1e} |"))
    print("\n".join(lines))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
