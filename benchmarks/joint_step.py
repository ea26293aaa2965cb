"""Cost of one continuous-batching decode step (`kvfold.joint.JointCache`, what `kvfold serve` runs) by batch
size and path, side by side in one run.

B caches are each prefilled with a random prompt of --prompt tokens; then one-token forwards for all B together
are timed (median of --steps after warm-up steps, synchronised on CUDA). Paths:
- normal: each cache decodes through the normal kvfold path (`kvfold serve --no-fast`);
- segments: each cache runs the fast loop's segments (in-place pages, device tables), its own kernel launches;
- joint: the caches draw on one `pages.PoolSet`, so requests of one method attend in one launch per layer
  (`fastpath.joint_step`);
- graph: joint, replayed from a CUDA graph (`joint.JointGraphs`, what `kvfold serve` does on a GPU; the warm-up
  steps run and capture it). CUDA only.
On a CPU (the embedded model) the kernels do not run: segments and joint read through the reference, one by one.
Writes OUT.json and OUT.md.

    python benchmarks/joint_step.py --out benchmarks/results/joint_step_cpu
    python benchmarks/joint_step.py --device cuda --prompt 4096 --batches 1,8,16 --out $OUT/joint_step_h200
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kvfold  # noqa: E402
from kvfold.api import prefill, use_kvfold_attention  # noqa: E402
from kvfold.cache import KVFoldCache  # noqa: E402
from kvfold.fastpath import Segments  # noqa: E402
from kvfold.joint import JointCache, JointGraphs, joint_forward  # noqa: E402
from kvfold.models import load_model  # noqa: E402
from kvfold.pages import PoolSet  # noqa: E402
from chunked_prefill import CONFIGS, random_model  # noqa: E402

PATHS = ("normal", "segments", "joint", "graph")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(model, caches: list[KVFoldCache], segments: list[Segments] | None, steps: int, warmup: int,
            device: str, graphs: JointGraphs | None = None) -> float:
    """Median wall time of a joint one-token forward, as the engine runs it (segments begun and refreshed)."""
    times = []
    ids = torch.full((len(caches), 1), 42, device=device)
    for step in range(warmup + steps):
        sync(device)
        started = time.perf_counter()
        moved = not all([group.begin() for group in (segments or ())])
        moved |= any([group.refresh() for group in (segments or ())])
        if graphs is not None:
            positions = torch.tensor([[group.seen] for group in segments], device=device)
            graphs.step(caches, ids, positions, moved)
        else:
            joint_forward(model, caches, ids, JointCache(caches).positions(device))
        for group in (segments or ()):
            group.advance()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    for group in (segments or ()):
        group.close()
    return statistics.median(times) * 1e3


def build_model(args) -> tuple[torch.nn.Module, str]:
    if args.device == "cuda":
        return random_model(args.config), f"{args.config} (random init, bf16)"
    model, _ = load_model(args.model)
    return model, "embedded:SmolLM2-135M-Instruct (float32)" if args.model is None else f"{args.model} (float32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="llama-3.1-8b", choices=sorted(CONFIGS), help="CUDA: random-init shape")
    parser.add_argument("--model", default=None, help="CPU: a local model (default: the embedded one)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--methods", default="none,snapkv:0.5+kivi:4")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--prompt", type=int, default=330, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (the server's default)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown path(s) {sorted(unknown)}: choose from {', '.join(PATHS)}")
    torch.set_num_threads(args.threads)
    model, described = build_model(args)
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode(), use_kvfold_attention(model):
        for method in args.methods.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for path in paths:
                    if path == "graph" and args.device != "cuda":
                        continue
                    pools = PoolSet() if path in ("joint", "graph") else None
                    caches = [KVFoldCache(model.config, method, compress_appends=True, pools=pools)
                              for _ in range(batch)]
                    for cache in caches:
                        prefill(model, cache, torch.randint(100, 1000, (1, args.prompt), device=args.device))
                    segments = None if path == "normal" else [
                        Segments(list(c.layers), args.device, args.warmup + args.steps) for c in caches]
                    graphs = JointGraphs(model, torch.device(args.device)) if path == "graph" else None
                    ms = step_ms(model, caches, segments, args.steps, args.warmup, args.device, graphs)
                    if graphs is not None and (graphs.failed or not graphs.replays):
                        raise SystemExit(f"the joint step was not replayed from a graph: {graphs.failed}")
                    rows.append({"method": method, "batch": batch, "path": path, "step_ms": round(ms, 2),
                                 "ms_per_request": round(ms / batch, 2)})
                    print(f"{method:20s} batch {batch:3d} {path:8s}: {ms:8.2f} ms per step, "
                          f"{ms / batch:7.2f} ms per request", flush=True)
                    del caches, segments, graphs
    for row in rows:
        normal = next((r["step_ms"] for r in rows if r["method"] == row["method"] and r["batch"] == row["batch"]
                       and r["path"] == "normal"), None)
        row["speedup_vs_normal"] = round(normal / row["step_ms"], 2) if normal else None
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    report = {"model": described, "device": device, "prompt_tokens": args.prompt, "steps": args.steps,
              "warmup": args.warmup, "torch_threads": args.threads if args.device == "cpu" else None,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "kvfold": kvfold.__version__, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# One continuous-batching decode step by batch size and path ({device}, torch {report['torch']})", "",
             f"{described}; each request's cache prefilled with {args.prompt} random tokens; median of {args.steps} "
             f"one-token steps for all requests together after {args.warmup} warm-up "
             "(`benchmarks/joint_step.py`). normal: `kvfold serve --no-fast`; segments: each request's own fast "
             "segments and kernel launches; joint: one page-pool set, one launch per layer for a method's requests; "
             "graph: joint, replayed from a CUDA graph.",
             "", "| method | batch | path | ms per step | ms per request | speed-up over normal |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['batch']} | {r['path']} | {r['step_ms']} | {r['ms_per_request']} | "
              f"{r['speedup_vs_normal'] or '—'} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
