"""The `kvfold` command line (Typer + Rich): methods, generate, chat, demo, bench.

Every user mistake is a `KVFoldError`: one red line naming the fix and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import KVFoldError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Real, composable, measured KV-cache compression for Hugging Face causal LMs.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="Local folder, .gguf file or hub id; "
                                                    "default: the embedded SmolLM2-135M-Instruct")]
MethodOption = Annotated[str, typer.Option("--method", help="Method spec, e.g. snapkv:0.5+kivi:4 (see `kvfold methods`)")]
ChunkOption = Annotated[Optional[int], typer.Option("--prefill-chunk", min=1, help="Read the context N tokens at a time, "
                                                    "compressing after each chunk (bounded memory)")]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _load(model: str | None):
    from transformers.utils import logging as hf_logging

    from .models import load_model

    hf_logging.disable_progress_bar()  # our spinner says what is happening

    with console.status(f"loading {model or 'the embedded SmolLM2-135M-Instruct'}…"):
        return load_model(model)


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
    console.print("Compose with '+' (evict, then quantize) and pick a budget with '@': snapkv:0.75@adakv+kivi:4")


@app.command()
def generate(
    method: MethodOption = "none",
    question: Annotated[list[str], typer.Option("--question", "-q", help="Question(s); repeat for several")] = [],
    context_file: Annotated[Optional[Path], typer.Option("--context-file", "-c", help="Text file with the context")] = None,
    context: Annotated[Optional[str], typer.Option("--context", help="The context as a string")] = None,
    agnostic: Annotated[bool, typer.Option("--agnostic", help="Compress the context before any question is seen")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    prefill_chunk: ChunkOption = None,
    model: ModelOption = None,
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
    lm, tokenizer = _load(model)
    with console.status(f"prefill + decode with {compressor.spec}…"):
        answers = run(lm, tokenizer, context=context, question=question, method=compressor, agnostic=agnostic,
                      max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk)
    for q, answer in zip(question, answers):
        console.print(f"[bold]Q:[/bold] {q}\n[bold]A:[/bold] {answer.text.strip()}")
        speed = len(answer.tokens) / answer.decode_seconds if answer.decode_seconds > 0 else float("nan")
        console.print(f"[dim]KV held {human_bytes(answer.kv_bytes)} · prefill {answer.prefill_seconds:.2f} s · "
                      f"decode {speed:.1f} tok/s · {compressor.spec} · "
                      f"{'query-agnostic' if agnostic else 'query-aware'}[/dim]")


@app.command()
def chat(method: MethodOption = "snapkv:0.5", model: ModelOption = None,
         max_new_tokens: Annotated[int, typer.Option(min=1)] = 128) -> None:
    """Multi-turn chat; the history stays compressed and the KV bytes are shown after each turn (Ctrl-D ends)."""
    from .chat import ChatSession

    lm, tokenizer = _load(model)
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
    methods_: Annotated[str, typer.Option("--methods", help="Comma-separated specs")] = "none,streaming,snapkv,adakv,kivi:4,kivi:2",
    ratios: Annotated[str, typer.Option(help="Comma-separated eviction ratios")] = "0.5",
    length: Annotated[int, typer.Option(help="Context length in tokens")] = 1024,
    samples: Annotated[int, typer.Option(min=1, help="Needles (depths spread over 10–90%)")] = 3,
    agnostic: Annotated[bool, typer.Option("--agnostic", help="Compress before the question is seen")] = False,
    prefill_chunk: ChunkOption = None,
    model: ModelOption = None,
) -> None:
    """A small needle-in-a-haystack sweep: accuracy, KV bytes and speed per method."""
    from .demo import expand_specs, run_demo

    try:
        ratio_values = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise KVFoldError(f"--ratios takes comma-separated numbers in [0, 1), got '{ratios}'") from None
    compressors = expand_specs([m for m in methods_.split(",") if m.strip()], ratio_values)
    lm, tokenizer = _load(model)
    run_demo(lm, tokenizer, compressors, length=length, samples=samples, agnostic=agnostic, console=console,
             prefill_chunk=prefill_chunk)


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
    seed: Annotated[int, typer.Option(help="Seed of the task samples")] = 0,
    model: ModelOption = None,
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
                         max_new_tokens=max_new_tokens, seed=seed)
    lm, tokenizer = _load(model)
    name = model or "embedded:SmolLM2-135M-Instruct"
    try:
        rows = run_bench(lm, tokenizer, config, model_name=name, console=console)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished answers are in {config.out / 'results.jsonl'}; run the same "
                          "command again to resume")
        raise SystemExit(130) from None
    if rows:
        lengths_text = ", ".join(str(n) for n in config.lengths)
        console.print(summary_table(rows, title=f"kvfold bench · {name} · lengths {lengths_text}"))
    skipped = f", {len(rows.warnings)} bad line(s) skipped" if rows.warnings else ""
    console.print(f"{len(rows)} rows ({rows.computed} new{skipped}) in {rows.path}")


def run() -> None:
    """Entry point: Typer handles usage errors and --help; a KVFoldError becomes one line and exit code 2."""
    try:
        app()
    except KVFoldError as err:
        if "--debug" in sys.argv:
            raise
        err_console.print(f"[red]error:[/red] {err}")
        raise SystemExit(2) from None
