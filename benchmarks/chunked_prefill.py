"""Peak memory of a long prefill: compress-after-prefill vs kvfold's one pass vs kvfold's chunked prefill.

Three ways to end up with the same budget of kept tokens, measured side by side in one run:
- `dynamic`: transformers' default `DynamicCache` holds the whole prompt's K/V; this is what a toolkit that
  compresses after the prefill must hold at its peak (it compresses only afterwards);
- `one-pass`: kvfold's prefill in one forward, each layer compressed as the forward passes through it;
- `chunk-N`: kvfold's chunked prefill (`prefill_chunk=N`): after each chunk the store is evicted back to the
  budget, so the K/V held never exceeds budget + one chunk.
With `--reference`, every chunked mode also runs as `chunk-N-ref` with `KVFOLD_KERNELS=reference` (each chunk's
attention over the store through the float32 PyTorch reference instead of SDPA over the gathered store), and
the table gives the largest |difference| of the last logits between the two.
Recorded: the KV bytes at their peak (DynamicCache tensors / kvfold pool capacity high-water mark), the bound
budget + chunk in the model's dtype, the process's peak memory above its level before the prefill (CPU: RSS
sampled every 2 ms in the child process that runs the config; CUDA: `max_memory_allocated`), and seconds.

    python benchmarks/chunked_prefill.py --lengths 4096,8192 --budget 1024 --chunks 512,1024          # CPU, embedded
    python benchmarks/chunked_prefill.py --device cuda --config llama-3.1-8b --lengths 32768,131072 \
        --budget 4096 --chunks 2048,4096 --out results.json                                            # GPU, random init
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import kvfold  # noqa: E402
from kvfold.api import prefill, use_kvfold_attention  # noqa: E402

CONFIGS = {  # real model shapes for random-init GPU runs (weights do not travel; memory does not depend on them)
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory in a thread; `.peak` is the highest reading."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def random_model(config_name: str, layers: int | None = None) -> torch.nn.Module:
    """A randomly initialised model of a real shape (`CONFIGS`) on the GPU, in bfloat16, seeded; `layers` keeps
    only the first that many (what costs per layer is measured on fewer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = CONFIGS[config_name] | ({"num_hidden_layers": layers} if layers else {})
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: no float32 copy of 8B weights on the way
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def load(args):
    if args.device == "cuda":
        return random_model(args.config), None
    return kvfold.load_model(args.model)


def prompt_ids(args, model, tokenizer, length: int) -> torch.Tensor:
    if tokenizer is None:
        gen = torch.Generator().manual_seed(length)
        return torch.randint(10, model.config.vocab_size, (args.batch, length), generator=gen).to(args.device)
    from kvfold.bench.tasks import build_haystack

    text = build_haystack(tokenizer, length, seed=0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return torch.tensor([ids] * args.batch)


def kv_bytes_per_token(model) -> int:
    """Bytes one token's K and V take over all layers in the model's dtype (what a DynamicCache holds)."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


@torch.inference_mode()
def measure(args, model, tokenizer, mode: str, length: int) -> dict:
    ids = prompt_ids(args, model, tokenizer, length)
    length = ids.shape[1]
    per_token = kv_bytes_per_token(model)
    cuda = args.device == "cuda"
    model(input_ids=ids[:, :64], use_cache=False, logits_to_keep=1)  # warm-up: weights paged in, allocator primed
    if cuda:
        import gc

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    chunk = int(mode.split("-")[1]) if mode.startswith("chunk-") else None
    reference = mode.endswith("-ref")
    spec = f"{args.method}:budget={args.budget}"
    row = {"mode": mode, "length": length, "batch": ids.shape[0], "method": "none" if mode == "dynamic" else spec,
           "chunk": chunk, "kv_full_bytes": per_token * length * ids.shape[0],
           "bound_bytes": per_token * (args.budget + chunk) * ids.shape[0] if chunk else None}
    try:
        previous = os.environ.get("KVFOLD_KERNELS")
        if reference:
            os.environ["KVFOLD_KERNELS"] = "reference"
        try:
            row.update(run_prefill(model, ids, mode, spec, chunk, cuda))
        finally:
            if reference:
                os.environ.pop("KVFOLD_KERNELS") if previous is None else os.environ.update(KVFOLD_KERNELS=previous)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    if row["bound_bytes"]:
        row["kv_peak_over_bound"] = round(row["kv_peak_bytes"] / row["bound_bytes"], 3)
    if cuda:
        row["process_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    return row


def run_prefill(model, ids: torch.Tensor, mode: str, spec: str, chunk: int | None, cuda: bool) -> dict:
    start = time.perf_counter()
    with PeakRSS() as rss:
        rss_before = rss.peak
        if mode == "dynamic":
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            kv_peak = kv_final = sum(t.numel() * t.element_size() for layer in cache.layers
                                     for t in (layer.keys, layer.values))
        else:
            with use_kvfold_attention(model):
                cache = kvfold.make_cache(model, spec)
                logits = prefill(model, cache, ids, chunk=chunk)
            kv_peak, kv_final = cache.peak_nbytes(), cache.nbytes()
        if cuda:
            torch.cuda.synchronize()
    out = {"seconds": round(time.perf_counter() - start, 3), "kv_peak_bytes": kv_peak, "kv_final_bytes": kv_final,
           "logits": logits[:, -1].float().cpu()}
    if not cuda:
        out["process_peak_bytes"] = rss.peak - rss_before
    del cache
    return out


def environment(args) -> dict:
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "kvfold": kvfold.__version__,
           "python": platform.python_version(), "device": args.device}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_count"] = os.cpu_count()
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="CPU: model path (default: the embedded SmolLM2)")
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS), help="CUDA: random-init shape")
    parser.add_argument("--method", default="snapkv")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--chunks", default="512,1024")
    parser.add_argument("--reference", action="store_true", help="also run each chunked mode over the reference")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = ["dynamic", "one-pass"] + [f"chunk-{c}{ref}" for c in args.chunks.split(",")
                                       for ref in ("", "-ref")[:2 if args.reference else 1]]
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.one:  # child process: one configuration, one JSON line
        model, tokenizer = load(args)
        row = measure(args, model, tokenizer, args.one[0], int(args.one[1]))
        row.pop("logits", None)
        print(json.dumps(row), flush=True)
        return
    rows = []
    if args.device == "cuda":  # one process: the allocator's peak is reset per configuration
        model, tokenizer = load(args)
        for length in lengths:
            logits = {}
            for mode in modes:
                rows.append(measure(args, model, tokenizer, mode, length))
                logits[mode] = rows[-1].pop("logits", None)
                if mode.endswith("-ref") and logits.get(mode[:-4]) is not None and logits[mode] is not None:
                    diff = float((logits[mode[:-4]] - logits[mode]).abs().max())
                    rows[-1]["logits_max_diff_vs_sdpa"] = round(diff, 4)
                print(json.dumps(rows[-1]), flush=True)
    else:  # CPU: a fresh process per configuration so each RSS peak is its own
        for length in lengths:
            for mode in modes:
                cmd = [sys.executable, __file__, "--one", mode, str(length)] + sys.argv[1:]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "chunked_prefill", "environment": environment(args), "budget": args.budget,
              "rows": rows}
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table(result) + "\n")


def table(result: dict) -> str:
    mib = 2**20
    env = result["environment"]
    lines = [f"# Chunked prefill: peak memory ({env.get('gpu', env.get('cpu'))}, torch {env['torch']}, "
             f"transformers {env['transformers']})", "",
             f"Token budget {result['budget']} per row. KV peak: DynamicCache tensors, or kvfold's pool high-water "
             "mark; bound: budget + chunk tokens in the model dtype. Process peak: above the level before the prefill.",
             "chunk-N-ref: the same chunks with their attention over the store through the float32 reference; "
             "|Δ logits|: largest difference of the last logits from chunk-N (SDPA over the gathered store).",
             "", "| batch × length | mode | KV peak MiB | KV kept MiB | bound MiB | peak / bound | process peak MiB | s "
             "| \\|Δ logits\\| |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} × {r['length']} | {r['mode']} | {r['error']} (full KV would be "
                         f"{r['kv_full_bytes'] / mib:.0f}) | | | | | | |")
            continue
        bound = f"{r['bound_bytes'] / mib:.1f}" if r["bound_bytes"] else "—"
        lines.append(f"| {r['batch']} × {r['length']} | {r['mode']} | {r['kv_peak_bytes'] / mib:.1f} | {r['kv_final_bytes'] / mib:.1f} "
                     f"| {bound} | {r.get('kv_peak_over_bound', '—')} | {r['process_peak_bytes'] / mib:.0f} "
                     f"| {r['seconds']:.1f} | {r.get('logits_max_diff_vs_sdpa', '—')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
