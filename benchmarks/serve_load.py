"""Load test of `kvfold serve`: N concurrent streaming chat clients for T seconds on loopback.

Starts `kvfold serve` in a child process (or targets --url), then each client sends streaming chat requests back
to back until T seconds have passed; requests in flight then finish. Checked, and the run fails if not:
- nothing lost or duplicated: every request sent gets exactly one outcome, response ids are unique, and the
  server's own counters (`/metrics`: 200s of /v1/chat/completions, generated tokens) equal what the clients saw;
- every stream is well formed: only `data: {json}` events, one id per stream, the role first, exactly one
  finish_reason, then the usage chunk, then `data: [DONE]` last;
- no cross-talk: greedy answers to the same question are identical across all clients;
- with --overload-seconds, a second server with a tiny --kv-budget and queue: every request gets 200 or a 429/503
  with Retry-After (clients back off as told), never another status or a dropped connection, and it stays healthy.
Recorded: latency (request to last byte) and time to first token p50/p95, requests/s and tokens/s, the prefix
cache's hit rate, device and versions. Writes OUT.json and OUT.md.

    python benchmarks/serve_load.py --clients 32 --seconds 60 --max-tokens 16      # embedded model, CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PREAMBLE = ("You are a concise assistant for a library that compresses the key-value cache of language models. "
            "It evicts tokens that attention rarely reads, packs the rest into a few bits, and keeps a radix tree "
            "of compressed prefixes so that requests sharing a system prompt skip most of their prefill. ") * 5
QUESTIONS = ["What is a key-value cache?", "Name a colour.", "What is 2 + 2?", "Say hello in French."]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, key: str, port: int, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "kvfold", "serve", "--port", str(port), "--method", args.method,
               "--queue", str(max(args.clients, 1)), "--max-tokens", str(args.max_tokens),
               "--max-batch", str(args.max_batch), *extra]
    if args.model:
        command += ["--model", args.model]
    if args.device:
        command += ["--device", args.device]
    env = {**os.environ, "KVFOLD_API_KEY": key, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


async def wait_healthy(url: str, process: subprocess.Popen | None, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise SystemExit(f"the server exited with code {process.returncode} (see its log)")
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("the server did not become healthy")


def check_stream(events: list[str], max_tokens: int) -> tuple[dict, list[str]]:
    """Parse one event stream; returns (summary, problems)."""
    problems, ids, finishes, texts, usage = [], set(), [], [], None
    if not events or events[-1] != "data: [DONE]":
        problems.append("stream does not end with data: [DONE]")
    for index, event in enumerate(events[:-1] if events and events[-1] == "data: [DONE]" else events):
        if not event.startswith("data: {"):
            problems.append(f"event {index} is not 'data: {{json}}': {event[:60]!r}")
            continue
        chunk = json.loads(event[6:])
        ids.add(chunk.get("id"))
        if "error" in chunk:
            problems.append(f"error event: {chunk['error']}")
            continue
        if not chunk["choices"]:
            usage = chunk.get("usage")
            continue
        choice = chunk["choices"][0]
        if index == 0 and choice["delta"].get("role") != "assistant":
            problems.append("first chunk carries no assistant role")
        if choice["finish_reason"] is not None:
            finishes.append(choice["finish_reason"])
        texts.append(choice["delta"].get("content") or "")
    if len(ids) != 1:
        problems.append(f"{len(ids)} ids in one stream")
    if len(finishes) != 1:
        problems.append(f"{len(finishes)} finish reasons")
    if usage is None or usage["completion_tokens"] > max_tokens:
        problems.append(f"usage missing or over max_tokens: {usage}")
    return {"id": next(iter(ids), None), "text": "".join(texts), "usage": usage}, problems


def has_content(event: str) -> bool:
    """A chunk event whose delta carries text (time to first token)."""
    if not event.startswith("data: {"):
        return False
    choices = json.loads(event[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


async def one_request(client: httpx.AsyncClient, url: str, key: str, question: str, args, tag: str) -> dict:
    body = {"model": args.model_id, "max_tokens": args.max_tokens, "stream": True, "user": tag,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": PREAMBLE}, {"role": "user", "content": question}]}
    start, first = time.perf_counter(), None
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode()
            try:
                code = json.loads(text)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = None
            return {"status": response.status_code, "start": start, "end": time.perf_counter(), "error": text[:200],
                    "code": code, "retry_after": response.headers.get("Retry-After"), "problems": []}
        raw = ""
        async for piece in response.aiter_text():
            raw += piece
            if first is None and any(has_content(e) for e in raw.split("\n\n")[:-1]):
                first = time.perf_counter()
    end = time.perf_counter()
    events = [e for e in raw.split("\n\n") if e]
    summary, problems = check_stream(events, args.max_tokens)
    return {"status": 200, "start": start, "first": first or end, "end": end, "question": question,
            "problems": problems, **summary}


async def client_loop(index: int, url: str, key: str, args, deadline: float, results: list) -> None:
    timeout = httpx.Timeout(args.seconds * 20 + 600)
    async with httpx.AsyncClient(timeout=timeout) as client:
        sent = 0
        while time.monotonic() < deadline:
            question = QUESTIONS[(index + sent) % len(QUESTIONS)]
            try:
                result = await one_request(client, url, key, question, args, f"client{index}-{sent}")
            except httpx.HTTPError as err:
                result = {"status": "transport", "error": repr(err), "problems": [repr(err)]}
            results.append(result)
            sent += 1
            if result["status"] in (429, 503) and result.get("retry_after"):  # refused: back off as told (capped,
                await asyncio.sleep(min(float(result["retry_after"]), 1.0))  # so the phase stays bounded)


async def scrape(url: str, key: str) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"})).text
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(kvfold_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def environment(args_device: str | None = None) -> dict:
    import fastapi
    import torch
    import transformers
    import uvicorn

    sys.path.insert(0, str(ROOT / "src"))
    import kvfold

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args_device != "cpu" else "cpu"
    return {"device": device, "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__, "httpx": httpx.__version__, "kvfold": kvfold.__version__,
            "git_revision": revision.strip() or None}


async def phase(url: str, key: str, args, clients: int, seconds: float) -> dict:
    """`clients` clients for `seconds`, then the requests in flight finish; summarized and checked."""
    before, load_before = await scrape(url, key), os.getloadavg()[0]
    results: list[dict] = []
    began, deadline = time.perf_counter(), time.monotonic() + seconds
    await asyncio.gather(*(client_loop(i, url, key, args, deadline, results) for i in range(clients)))
    wall = time.perf_counter() - began
    after = await scrape(url, key)
    return summarize(clients, seconds, results, wall, before, after, (load_before, os.getloadavg()[0]))


def summarize_overload(clients: int, seconds: float, results: list[dict], wall: float, before: dict, after: dict,
                       healthy_after: bool, budget: int, peaks: dict[str, float]) -> dict:
    """The overload phase: every request answered 200 (a well-formed stream) or refused with 429 or 503 and a
    Retry-After; no other status, no broken connection; the server's counters agree and it is healthy after."""
    problems = [p for r in results for p in r["problems"]]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        if r["status"] not in (200, 429, 503):
            problems.append(f"status {r['status']}: {r.get('error', '')[:120]}")
        elif r["status"] != 200 and not r.get("retry_after"):
            problems.append(f"a {r['status']} ({r.get('code')}) without Retry-After")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    for status in (200, 429, 503):
        served = delta.get(f'kvfold_requests_total{{endpoint="/v1/chat/completions",status="{status}"}}', 0)
        if served != statuses.get(str(status), 0):
            problems.append(f"server counted {served:g} answers {status}, clients received "
                            f"{statuses.get(str(status), 0)}")
    if not healthy_after:
        problems.append("the server was not healthy after the phase")
    codes = sorted({f"{r['status']} {r.get('code')}" for r in results if r["status"] in (429, 503)})
    return {"clients": clients, "seconds": seconds, "requests": len(results), "statuses": statuses,
            "refusal_codes": codes, "wall_seconds": round(wall, 2), "kv_budget": budget,
            "peak_gauges": peaks, "problems": problems[:20], "problem_count": len(problems)}


async def overload_phase(args, key: str) -> dict:
    """A second server with a KV budget for about `--overload-requests` requests and a queue of `--overload-queue`:
    `--clients` clients for `--overload-seconds`, backing off as each refusal's Retry-After says (at most 1 s)."""
    sys.path.insert(0, str(ROOT / "src"))
    from kvfold.serve import parse_bytes

    budget = parse_bytes(args.overload_budget)
    port, log = free_port(), Path(args.log).with_suffix(".overload.log")
    process = start_server(args, key, port, log, ("--kv-budget", str(budget), "--queue", str(args.overload_queue)))
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, process)
        before, results = await scrape(url, key), []
        peaks = dict.fromkeys(("kvfold_kv_bytes_prefix_cache", "kvfold_kv_bytes_live", "kvfold_queue_length",
                               "kvfold_running_requests"), 0.0)
        began, deadline = time.perf_counter(), time.monotonic() + args.overload_seconds

        async def watch() -> None:  # the server's gauges, sampled while the clients run
            while time.monotonic() < deadline:
                values = await scrape(url, key)
                for name in peaks:
                    peaks[name] = max(peaks[name], values.get(name, 0))
                await asyncio.sleep(0.2)

        await asyncio.gather(watch(), *(client_loop(i, url, key, args, deadline, results)
                                        for i in range(args.clients)))
        wall = time.perf_counter() - began
        after = await scrape(url, key)
        async with httpx.AsyncClient() as client:
            healthy = (await client.get(url + "/health")).status_code == 200 and process.poll() is None
        return summarize_overload(args.clients, args.overload_seconds, results, wall, before, after, healthy, budget,
                                  {name.removeprefix("kvfold_"): value for name, value in peaks.items()})
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


async def run(args) -> dict:
    key = os.environ.get("KVFOLD_API_KEY") or secrets.token_hex(16)
    process, url = None, args.url
    if url is None:
        port, log = free_port(), Path(args.log)
        process = start_server(args, key, port, log)
        url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, process)
        phases = []
        if args.baseline_seconds > 0:  # one client: the service time of a request without queueing
            phases.append(await phase(url, key, args, 1, args.baseline_seconds))
        phases.append(await phase(url, key, args, args.clients, args.seconds))
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    overload = await overload_phase(args, key) if args.overload_seconds > 0 and args.url is None else None
    return {"settings": {"clients": args.clients, "seconds": args.seconds, "baseline_seconds": args.baseline_seconds,
                         "max_tokens": args.max_tokens, "method": args.method, "model": args.model_id,
                         "server_threads": args.threads, "max_batch": args.max_batch,
                         "prompt": "shared system preamble + one of 4 short questions, greedy"},
            "phases": phases, "overload": overload,
            "problem_count": sum(p["problem_count"] for p in phases) + (overload["problem_count"] if overload else 0),
            "environment": environment(args.device)}


def summarize(clients: int, seconds: float, results: list[dict], wall: float, before: dict, after: dict,
              load: tuple[float, float]) -> dict:
    ok = [r for r in results if r["status"] == 200]
    problems = [p for r in results for p in r["problems"]]
    ids = [r["id"] for r in ok]
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicated response ids")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    served_ok = delta.get('kvfold_requests_total{endpoint="/v1/chat/completions",status="200"}', 0)
    if served_ok != len(ok):
        problems.append(f"server counted {served_ok:g} answered requests, clients received {len(ok)}")
    tokens = sum(r["usage"]["completion_tokens"] for r in ok if r["usage"])
    if delta.get("kvfold_generated_tokens_total", 0) != tokens:
        problems.append(f"server generated {delta.get('kvfold_generated_tokens_total', 0):g} tokens, "
                        f"clients got {tokens}")
    for question in QUESTIONS:
        answers = {r["text"] for r in ok if r["question"] == question}
        if len(answers) > 1:  # where they part tells rounding (late) from a wrong read (the first tokens)
            shared = len(os.path.commonprefix(sorted(answers)))
            problems.append(f"{len(answers)} different greedy answers to {question!r} (the same first {shared} "
                            f"characters of {min(len(a) for a in answers)}-{max(len(a) for a in answers)})")
    latency = [r["end"] - r["start"] for r in ok]
    ttft = [r["first"] - r["start"] for r in ok]
    hits, misses = delta.get("kvfold_prefix_cache_hits_total", 0), delta.get("kvfold_prefix_cache_misses_total", 0)
    return {
        "clients": clients, "seconds": seconds, "requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "problems": problems[:20], "problem_count": len(problems),
        "wall_seconds": round(wall, 2), "requests_per_second": round(len(ok) / wall, 3),
        "completion_tokens": tokens, "tokens_per_second": round(tokens / wall, 2),
        "latency_s": {"p50": round(percentile(latency, 50), 3), "p95": round(percentile(latency, 95), 3),
                      "max": round(max(latency), 3)} if ok else None,
        "ttft_s": {"p50": round(percentile(ttft, 50), 3), "p95": round(percentile(ttft, 95), 3)} if ok else None,
        "prompt_tokens_mean": round(statistics.mean(r["usage"]["prompt_tokens"] for r in ok if r["usage"]), 1)
        if ok else None,
        "prefix_cache": {"hits": hits, "misses": misses,
                         "hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
                         "reused_tokens": delta.get("kvfold_reused_tokens_total", 0),
                         "prefilled_tokens": delta.get("kvfold_prefilled_tokens_total", 0)},
        "load_average_1min": [round(x, 2) for x in load],
        # one joint forward per step for every running request; each request's first token comes from its prefill
        "decode_steps": delta.get("kvfold_decode_steps", 0),
        "graph_replays": delta.get("kvfold_decode_graph_replays", 0),
        "mean_batch": round((tokens - len(ok)) / delta["kvfold_decode_steps"], 2)
        if delta.get("kvfold_decode_steps") else None,
    }


def overload_lines(o: dict | None) -> list[str]:
    if not o:
        return []
    statuses = ", ".join(f"{count} × {status}" for status, count in sorted(o["statuses"].items()))
    return ["", f"Overload ({o['clients']} clients for {o['seconds']:g} s against a second server with `--kv-budget "
            f"{o['kv_budget']}` and a small queue; a refused client waits as Retry-After says, at most 1 s): "
            f"{o['requests']} requests answered {statuses} (refusals: {', '.join(o['refusal_codes']) or 'none'}); "
            "peaks sampled every 0.2 s: " + ", ".join(f"{k} {v:g}" for k, v in o["peak_gauges"].items())
            + ". Checks (only 200, 429 or 503, every refusal with Retry-After, the server's counters equal the "
            "clients', healthy after): "
            + ("all passed." if not o["problem_count"] else f"{o['problem_count']} problems (first: {o['problems'][:3]}).")]


def markdown(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    where = env["device"] if env.get("device", "cpu") != "cpu" else f"{env['cpu']}, {env['cpu_count']} cores"
    lines = [f"# kvfold serve under load ({where}, torch {env['torch']})", "",
             f"Streaming chat clients on loopback against `kvfold serve --method {s['method']}` ({s['model']}, server "
             f"torch threads {s['server_threads']}); {s['prompt']}; max_tokens {s['max_tokens']}. Each client sends "
             "its next request when the previous one ends; after the phase's seconds no new request starts and "
             "those in flight finish (wall = the phase plus that drain). Continuous batching: up to "
             f"{s.get('max_batch', 1)} requests decoded together, one forward per step (mean batch: rows per decode "
             "step); prompts are prefilled one request at a time.", "",
             "| clients | seconds | requests | completed | failed | problems | wall s | req/s | tokens/s | "
             "latency p50 | latency p95 | TTFT p50 | TTFT p95 | prefix hit rate | mean batch | load avg (start, end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["phases"]:
        lat, ttft, prefix = p["latency_s"] or {}, p["ttft_s"] or {}, p["prefix_cache"]
        lines.append(f"| {p['clients']} | {p['seconds']:g} | {p['requests']} | {p['completed']} | {p['failed']} | "
                     f"{p['problem_count']} | {p['wall_seconds']} | {p['requests_per_second']} | "
                     f"{p['tokens_per_second']} | {lat.get('p50')} s | {lat.get('p95')} s | {ttft.get('p50')} s | "
                     f"{ttft.get('p95')} s | {prefix['hit_rate']} | {p.get('mean_batch')} | {p['load_average_1min']} |")
    main = report["phases"][-1]
    reused, prefilled = main["prefix_cache"]["reused_tokens"], main["prefix_cache"]["prefilled_tokens"]
    lines += ["", f"Prompt tokens per request: {main['prompt_tokens_mean']} on average; in the "
              f"{main['clients']}-client phase the prefix cache reused {reused:g} and prefilled {prefilled:g} prompt "
              "tokens (the first request of the run fills it)."
              + (f" Decode steps replayed from a CUDA graph: {main.get('graph_replays', 0):g} of "
                 f"{main['decode_steps']:g}." if main.get("graph_replays") else ""),
              "Checks in every phase: every request got one outcome, response ids unique, the server's counters equal "
              "what the clients received, every stream well formed, identical greedy answers per question: "
              + ("all passed." if not report["problem_count"] else f"{report['problem_count']} problems "
                 f"(first: {[p['problems'][:3] for p in report['phases']]})."),
              ] + overload_lines(report.get("overload")) + [
              "", "Versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("cpu", "cpu_count")) + ".",
              "Clients and server ran on the same machine" + (" (the server on its GPU)." if env.get("device", "cpu")
              != "cpu" else ", on 2 CPU cores which other work shared during the run (the 1-minute load average is "
              "in the table): the absolute speeds are those of a busy machine.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--baseline-seconds", type=float, default=20, help="a 1-client phase first (0: none)")
    parser.add_argument("--method", default="none")
    parser.add_argument("--max-batch", type=int, default=8, help="--max-batch of kvfold serve")
    parser.add_argument("--model", default=None, help="--model of kvfold serve (default: the embedded model)")
    parser.add_argument("--url", default=None, help="an already running server (KVFOLD_API_KEY: its key)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server process")
    parser.add_argument("--device", default=None, help="--device of kvfold serve (default: auto, the GPU if any)")
    parser.add_argument("--log", default="/tmp/kvfold_serve_load.log", help="the server's log")
    parser.add_argument("--overload-seconds", type=float, default=0,
                        help="then a phase against a second server with a tiny KV budget (0: none)")
    parser.add_argument("--overload-budget", default="48MiB", help="its --kv-budget")
    parser.add_argument("--overload-queue", type=int, default=2, help="its --queue")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load_cpu")
    args = parser.parse_args()
    args.model_id = args.model or "embedded:SmolLM2-135M-Instruct"
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if report["problem_count"] or any(p["failed"] or not p["completed"] for p in report["phases"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
