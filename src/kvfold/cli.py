"""The `kvfold` command line (Typer + Rich): methods, generate, chat, demo, bench.

Every user mistake is a `KVFoldError`: one red line naming the fix and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import KVFoldError
from .units import human_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Real, composable, measured KV-cache compression for Hugging Face causal LMs.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="Local folder, .gguf file or hub id; "
                                                    "default: the embedded SmolLM2-135M-Instruct")]
MethodOption = Annotated[str, typer.Option("--method", help="Method spec, e.g. snapkv:0.5+kivi:4 (see `kvfold methods`)")]
FastOption = Annotated[bool, typer.Option("--fast", help="Decode with the fast loop: pages written in place, "
                                          "Triton kernel and CUDA graphs on a GPU (same greedy tokens)")]
ChunkOption = Annotated[Optional[int], typer.Option("--prefill-chunk", min=1, help="Read the context N tokens at a time, "
                                                    "compressing after each chunk (bounded memory)")]


DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="float32, bfloat16, float16 or auto (bfloat16 on a GPU, "
                                          "float32 on a CPU)")]


def _load(model: str | None, device: str = "auto", dtype: str = "auto"):
    from transformers.utils import logging as hf_logging

    from .models import load_model, resolve_placement

    hf_logging.disable_progress_bar()  # our spinner says what is happening
    target, weights = resolve_placement(device, dtype)
    precision = str(weights).removeprefix("torch.")
    with console.status(f"loading {model or 'the embedded SmolLM2-135M-Instruct'} ({precision} on {target})…"):
        return load_model(model, dtype=weights, device=target)


@app.callback()
def main(ctx: typer.Context, debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks")] = False) -> None:
    ctx.obj = {"debug": debug}


@app.command()
def methods() -> None:
    """List the registered methods with their knobs."""
    from .compressor import registered_methods

    table = Table(title="kvfold methods")
    for column in ("name", "kind", "paper", "knobs (defaults)", "query-aware"):
        table.add_column(column)
    for name, cls in registered_methods().items():
        knobs = ", ".join(f"{k}={v}" for k, v in cls.knobs().items()) or "—"
        aware = {True: "yes", False: "no"}.get(getattr(cls, "query_aware", None), "—")
        table.add_row(name, cls.kind, cls.paper or "—", knobs, aware)
    console.print(table)
    console.print("Compose with '+' (evict, merge, rotate, then quantize) and pick a budget with '@': "
                  "snapkv:0.75@adakv+kivi:4, snapkv:0.5+merge+rotate+fp8")


@app.command()
def generate(
    method: MethodOption = "none",
    question: Annotated[list[str], typer.Option("--question", "-q", help="Question(s); repeat for several")] = [],
    context_file: Annotated[Optional[Path], typer.Option("--context-file", "-c", help="Text file with the context")] = None,
    context: Annotated[Optional[str], typer.Option("--context", help="The context as a string")] = None,
    agnostic: Annotated[bool, typer.Option("--agnostic", help="Compress the context before any question is seen")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    prefill_chunk: ChunkOption = None,
    fast: FastOption = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Answer questions about a context with a compressed KV cache."""
    from .api import generate as run
    from .compressor import Compressor

    compressor = Compressor.parse(method)
    if context_file is not None:
        if not context_file.is_file():
            raise KVFoldError(f"context file '{context_file}' does not exist")
        context = context_file.read_text(encoding="utf-8")
    if context is None:
        raise KVFoldError("no context: pass --context-file F or --context TEXT")
    if not question:
        raise KVFoldError("no question: pass --question Q (repeat it for several)")
    lm, tokenizer = _load(model, device, dtype)
    with console.status(f"prefill + decode with {compressor.spec}…"):
        answers = run(lm, tokenizer, context=context, question=question, method=compressor, agnostic=agnostic,
                      max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, fast=fast)
    for q, answer in zip(question, answers):
        console.print(f"[bold]Q:[/bold] {q}\n[bold]A:[/bold] {answer.text.strip()}")
        speed = len(answer.tokens) / answer.decode_seconds if answer.decode_seconds > 0 else float("nan")
        console.print(f"[dim]KV held {human_bytes(answer.kv_bytes)} · prefill {answer.prefill_seconds:.2f} s · "
                      f"decode {speed:.1f} tok/s · {compressor.spec} · "
                      f"{'query-agnostic' if agnostic else 'query-aware'}[/dim]")


@app.command()
def chat(method: MethodOption = "snapkv:0.5", model: ModelOption = None,
         max_new_tokens: Annotated[int, typer.Option(min=1)] = 128, device: DeviceOption = "auto",
         dtype: DtypeOption = "auto") -> None:
    """Multi-turn chat; the history stays compressed and the KV bytes are shown after each turn (Ctrl-D ends)."""
    from .chat import ChatSession

    lm, tokenizer = _load(model, device, dtype)
    session = ChatSession(lm, tokenizer, method)
    console.print(f"[dim]chatting with {session.compressor.spec}; Ctrl-D to end[/dim]")
    while True:
        try:
            message = console.input("[bold]you> [/bold]")
        except EOFError:
            console.print()
            return
        if not message.strip():
            continue
        reply = session.send(message, max_new_tokens=max_new_tokens)
        console.print(f"[bold]bot>[/bold] {reply.strip()}")
        console.print(f"[dim]KV held {human_bytes(session.cache.nbytes())} for {session.tokens_seen} tokens "
                      f"({human_bytes(session.uncompressed_bytes())} uncompressed)[/dim]")


@app.command()
def demo(
    methods_: Annotated[str, typer.Option("--methods", help="Comma-separated specs")] = "none,streaming,snapkv,kivi:4",
    ratios: Annotated[str, typer.Option(help="Comma-separated eviction ratios")] = "0.25,0.5",
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks (see `kvfold bench --help`)")] = "niah,multikey",
    length: Annotated[int, typer.Option(help="Context length in tokens")] = 1024,
    samples: Annotated[int, typer.Option(min=1, help="Seeded samples per task")] = 3,
    agnostic: Annotated[bool, typer.Option("--agnostic", help="Compress before the question is seen")] = False,
    prefill_chunk: ChunkOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.jsonl and the report (rerun to "
                                      "resume)")] = Path("out/demo"),
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """A small sweep (methods x ratios x tasks): accuracy with 95% intervals, KV bytes and speed per method, and
    the report (report.md, report.html, report.png) in --out. Each prompt's forward runs once for all the methods
    (`kvfold bench --shared-prefill`) unless --prefill-chunk is given."""
    from .bench.runner import BenchConfig, parse_list, split_specs
    from .demo import DEMO_NEW_TOKENS, run_demo_sweep

    config = BenchConfig(out=out, methods=split_specs(methods_), ratios=parse_list(ratios, float, "--ratios"),
                         tasks=parse_list(tasks, str, "--tasks"), lengths=(length,), samples=samples,
                         setting="agnostic" if agnostic else "aware", prefill_chunk=prefill_chunk,
                         max_new_tokens=DEMO_NEW_TOKENS, shared_prefill=prefill_chunk is None)
    lm, tokenizer = _load(model, device, dtype)
    try:
        run_demo_sweep(lm, tokenizer, config, model_name=model or "embedded:SmolLM2-135M-Instruct", console=console)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished answers are in {config.out / 'results.jsonl'}; run the same "
                          "command again to resume")
        raise SystemExit(130) from None


@app.command()
def bench(
    methods_: Annotated[str, typer.Option("--methods", help="Comma-separated specs; a spec without a ratio runs at "
                                          "each --ratios value")] = "none,snapkv",
    ratios: Annotated[str, typer.Option(help="Comma-separated eviction ratios in [0, 1)")] = "0.5",
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks: niah, multikey, multivalue, vt, cwe, multihop, "
                                       "multiturn")] = "niah",
    lengths: Annotated[str, typer.Option(help="Comma-separated context lengths in tokens")] = "2048",
    samples: Annotated[int, typer.Option(help="Seeded samples per task and length")] = 3,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for results.jsonl (required; rerun "
                                                "the same command to resume)")] = None,
    setting: Annotated[str, typer.Option(help="aware (question compressed with the context), agnostic (context "
                                         "compressed first, questions on forks) or both")] = "aware",
    prefill_chunk: ChunkOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    fast: FastOption = False,
    seed: Annotated[int, typer.Option(help="Seed of the task samples")] = 0,
    shared_prefill: Annotated[bool, typer.Option("--shared-prefill", help="Run each prompt's forward once for all "
                                                 "the methods and replay it into each one's cache (same answers, "
                                                 "much faster sweeps; one-pass prefills only; a row's peak memory "
                                                 "then includes the shared forward's tensors)")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Run each method's cells (with --shared-prefill: each task × length "
                                      "× setting's) as a Ray task (one GPU, or one CPU, "
                                      "each) on a new local Ray, or on RAY_ADDRESS's cluster; workers load the "
                                      "model in --dtype, float32 for auto")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Run on this Ray cluster (implies "
                                                       "--ray), e.g. auto or ray://host:10001")] = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Benchmark methods x ratios x tasks x lengths; one JSON line per answer in OUT/results.jsonl (resumable)."""
    from .bench.records import summary_table
    from .bench.runner import BenchConfig, parse_list, run_bench, split_specs

    if out is None:
        raise KVFoldError("no output folder: pass --out DIR (results go to DIR/results.jsonl; rerun the same "
                          "command to resume)")
    config = BenchConfig(out=out, methods=split_specs(methods_), ratios=parse_list(ratios, float, "--ratios"),
                         tasks=parse_list(tasks, str, "--tasks"), lengths=parse_list(lengths, int, "--lengths"),
                         samples=samples, setting=setting, prefill_chunk=prefill_chunk,
                         max_new_tokens=max_new_tokens, seed=seed, fast=fast, shared_prefill=shared_prefill)
    name = model or "embedded:SmolLM2-135M-Instruct"
    try:
        if ray or ray_address:
            from .bench.distributed import ModelSource, RayOptions, require_ray, run_bench_ray
            from .models import resolve_placement

            if device != "auto":
                raise KVFoldError("--device does not apply with --ray: each worker uses the GPU Ray gives it (or its "
                                  "CPU); drop --device")
            require_ray()
            weights = "float32" if dtype == "auto" else str(resolve_placement("cpu", dtype)[1]).removeprefix("torch.")
            rows = run_bench_ray(ModelSource(model, dtype=weights), config, model_name=name,
                                 options=RayOptions(ray_address), console=console)
        else:
            lm, tokenizer = _load(model, device, dtype)
            rows = run_bench(lm, tokenizer, config, model_name=name, console=console)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished answers are in {config.out / 'results.jsonl'}; run the same "
                          "command again to resume")
        raise SystemExit(130) from None
    if rows:
        lengths_text = ", ".join(str(n) for n in config.lengths)
        console.print(summary_table(rows, title=f"kvfold bench · {name} · lengths {lengths_text}"))
    skipped = f", {len(rows.warnings)} bad line(s) skipped" if rows.warnings else ""
    console.print(f"{len(rows)} rows ({rows.computed} new{skipped}) in {rows.path}; `kvfold report {config.out}` "
                  "writes its report")


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A `kvfold bench --out` folder (or its results.jsonl)")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the report files (default: the "
                                                "results' folder)")] = None,
) -> None:
    """Write report.md (tables with 95% intervals), report.html (offline interactive plots) and report.png."""
    from .bench.report import load_report, summary_grid

    result = load_report(folder)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    paths = result.write(out or result.source.parent)
    console.print(summary_grid(result, title=f"kvfold report · {len(result.rows)} rows").rich())
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command()
def serve(
    model: ModelOption = None,
    method: MethodOption = "none",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    kv_budget: Annotated[str, typer.Option("--kv-budget", help="Most KV bytes held: prefix-cache snapshots plus the "
                                           "running request (e.g. 2GiB, 512MiB)")] = "2GiB",
    block: Annotated[int, typer.Option("--block", "--prefill-chunk", min=1, help="Prompts are prefilled in chunks "
                                       "of this many tokens, each compressed as it arrives (bounded memory), and "
                                       "snapshotted chunk by chunk for the prefix cache")] = 256,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="KVFOLD_API_KEY", help="Require "
                                                   "'Authorization: Bearer KEY' (prefer $KVFOLD_API_KEY or "
                                                   "--api-keys-file: arguments show in ps)")] = None,
    api_keys_file: Annotated[Optional[Path], typer.Option("--api-keys-file", help="File with one accepted key "
                                                          "per line")] = None,
    rate_limit: Annotated[Optional[int], typer.Option("--rate-limit", min=1, help="Requests per minute per key "
                                                      "(per client address without keys)")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(min=1, help="Longest prompt accepted (default: "
                                                             "the model's context)")] = None,
    max_body_bytes: Annotated[int, typer.Option(min=64, help="Largest request body accepted (413 beyond)")] = 4 << 20,
    queue: Annotated[int, typer.Option(min=1, help="Requests waiting behind the running ones; more get 429")] = 16,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Requests decoded together, one forward "
                                           "per step (continuous batching)")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="max_tokens of requests that give "
                                            "none")] = 256,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Log prompt text (default: sizes only)")] = False,
    fast: Annotated[bool, typer.Option("--fast/--no-fast", help="Decode through the fast loop's in-place pages "
                                       "and device page tables (--no-fast: the normal per-step path)")] = True,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="On a GPU, replay the decode "
                                              "step of requests that keep decoding together from a CUDA graph")] = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) with a
    compressed prefix cache and continuous batching (up to --max-batch requests decoded in one forward per step).
    Greedy unless a request sets temperature > 0."""
    from .serve import ServeConfig, load_api_keys, parse_bytes, run_server

    keys = ((api_key,) if api_key else ()) + (load_api_keys(api_keys_file) if api_keys_file is not None else ())
    config = ServeConfig(model_id=model or "embedded:SmolLM2-135M-Instruct", method=method,
                         kv_budget=parse_bytes(kv_budget), block=block, api_keys=keys, rate_limit=rate_limit,
                         max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes, queue=queue,
                         max_batch=max_batch, default_max_tokens=max_tokens, log_prompts=log_prompts, fast=fast,
                         cuda_graphs=cuda_graphs)
    if host not in ("127.0.0.1", "localhost", "::1") and not keys:
        err_console.print(f"[yellow]warning:[/yellow] listening on {host} without an API key: anyone who can reach "
                          "it can use it (pass --api-keys-file F)")
    lm, tokenizer = _load(model, device, dtype)
    console.print(f"serving {config.model_id} with {config.method} on http://{host}:{port}/v1 · KV budget "
                  f"{human_bytes(config.kv_budget)} · block {block} · batch ≤ {max_batch} · queue {queue}"
                  f"{' · API keys on' if keys else ''}")
    run_server(lm, tokenizer, config, host=host, port=port)


@app.command("inspect")
def inspect_command(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for profile.json, maps.npz, the PNGs "
                                                "and index.html (required)")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="A text file to inspect, tokenized as is")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="A task sample to inspect (default niah): niah, "
                                                "multikey, multivalue, vt, cwe, multihop, multiturn")] = None,
    length: Annotated[Optional[str], typer.Option("--length", help="Tokens of the task sample, e.g. 2048 or 4k "
                                                  "(default 2k); with --text, keep the first N tokens")] = None,
    method: Annotated[list[str], typer.Option("--method", help="Spec whose kept tokens are mapped (default "
                                              "snapkv:0.5); repeat for several")] = [],
    seed: Annotated[int, typer.Option(help="Seed of the task sample")] = 0,
    depth: Annotated[float, typer.Option(help="niah: depth of the needle in [0, 1]")] = 0.5,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """One forward pass: attention sinks, head roles, K/V channel statistics and what a method keeps, as
    OUT/profile.json (read by budget methods) and plots in OUT/index.html."""
    from .bench.tasks import TASKS
    from .compressor import Compressor
    from .errors import closest
    from .inspection import InspectConfig, inspect_model, parse_length, task_input, text_input, write_inspection
    from .inspection.plots import summary_rows
    from .models import context_limit

    if out is None:
        raise KVFoldError("no output folder: pass --out DIR (profile.json, plots and index.html go there)")
    if text is not None and task is not None:
        raise KVFoldError("--text and --task both given: inspect either a text file or a task sample")
    if text is not None and not text.is_file():
        raise KVFoldError(f"text file '{text}' does not exist: pass an existing file to --text")
    task = task or "niah"
    if text is None and task not in TASKS:
        raise KVFoldError(f"unknown task '{task}'{closest(task, TASKS)}; valid: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise KVFoldError(f"--depth must be in [0, 1], got {depth}")
    tokens = parse_length(length) if length is not None else None
    specs = tuple(Compressor.parse(spec).spec for spec in (method or ["snapkv:0.5"]))
    config = InspectConfig(methods=specs)
    lm, tokenizer = _load(model, device, dtype)
    if tokens is not None and tokens > context_limit(lm.config):
        raise KVFoldError(f"--length {tokens} is past the model's context of {context_limit(lm.config)} tokens: "
                          "lower it")
    source = (text_input(tokenizer, text, tokens) if text is not None
              else task_input(tokenizer, task, tokens or 2048, seed=seed, depth=depth))
    with console.status(f"inspecting {len(source.ids)} tokens (one pass with {specs[0]})…"):
        result = inspect_model(lm, tokenizer, source, config, model_name=model or "embedded:SmolLM2-135M-Instruct")
        paths = write_inspection(result, out)
    table = Table(title="kvfold inspect", show_header=False)
    for label, value in summary_rows(result.profile):
        table.add_row(label, escape(value))
    console.print(table)
    console.print(f"wrote {len(paths)} files to {out}; open {out / 'index.html'}")


@app.command()
def calibrate(
    method: Annotated[str, typer.Option("--method", help="What to fit: rotate:oscar, or xkv[:key,value=,layers=] "
                                        "(its offline bases, at those ranks)")] = "rotate:oscar",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The .safetensors file to write (required)")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Passages of offline prose the model reads")] = 8,
    length: Annotated[int, typer.Option(min=16, help="Tokens per passage")] = 2048,
    bits: Annotated[int, typer.Option(help="Bits of the per-token quantizer the clip ratios are fitted for")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the passages and of the rows kept for fitting")] = 0,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Fit a method's per-model data on offline text (OSCAR's rotations and clip ratios, or xKV's bases) and save it
    with the model's identity; use it as `rotate:oscar,calib=FILE+kivi:2` or `xkv:calib=FILE`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .calibration import fit_oscar, fit_xkv, prose_passages, save_calibration
    from .compressor import Compressor
    from .errors import closest
    from .models import context_limit

    lowrank = Compressor.parse(method).lowrank if method.split(":")[0] == "xkv" else None
    if method != "rotate:oscar" and lowrank is None:
        raise KVFoldError(f"calibrate: unknown method '{method}'{closest(method, ['rotate:oscar', 'xkv'])}; valid: "
                          "rotate:oscar, xkv")
    if out is None:
        raise KVFoldError("no output file: pass --out FILE.safetensors")
    if bits not in (2, 4, 8):
        raise KVFoldError(f"--bits must be 2, 4 or 8, got {bits}")
    lm, tokenizer = _load(model, device, dtype)
    if length > context_limit(lm.config):
        raise KVFoldError(f"--length {length} is past the model's context of {context_limit(lm.config)} tokens: "
                          "lower it")
    columns = (TextColumn("calibrating {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(method, total=samples)
        passages = prose_passages(tokenizer, samples, length, seed)
        advance = lambda done: progress.update(task, completed=done)  # noqa: E731
        result = (fit_xkv(lm, passages, lowrank, seed=seed, on_sample=advance) if lowrank is not None
                  else fit_oscar(lm, passages, bits=bits, seed=seed, on_sample=advance))
    path = save_calibration(result, out, model or "embedded:SmolLM2-135M-Instruct")
    if lowrank is not None:
        console.print(f"wrote {path}: {len(result['tensors']) // 2} layer groups fitted on {result['tokens']} tokens; "
                      f"use xkv:calib={path}")
        return
    clips = result["tensors"]
    console.print(f"wrote {path}: {result['identity']['layers']} layers fitted on {result['tokens']} tokens; clip "
                  f"ratios keys {float(clips['key_clip'].min()):.2f}–{float(clips['key_clip'].max()):.2f}, values "
                  f"{float(clips['value_clip'].min()):.2f}–{float(clips['value_clip'].max()):.2f}; use "
                  f"rotate:oscar,calib={path}+kivi:2")


def run() -> None:
    """Entry point: Typer handles usage errors and --help; a KVFoldError becomes one line and exit code 2."""
    try:
        app()
    except KVFoldError as err:
        if "--debug" in sys.argv:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(err))}")  # messages may hold [brackets]
        raise SystemExit(2) from None
