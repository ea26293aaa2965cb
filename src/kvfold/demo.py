"""`kvfold demo`: a small sweep on the embedded model (a few methods x 2 ratios x 2 tasks, via `kvfold bench`) that
prints accuracy with 95% intervals, KV bytes and speed per method and writes the report (:func:`run_demo_sweep`);
:func:`run_demo` is the older needle-only table, kept for scripts."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .api import generate
from .bench.tasks import needle_samples, score_contains
from .compressor import Compressor
from .errors import KVFoldError


def expand_specs(specs: list[str], ratios: list[float]) -> list[Compressor]:
    """Each spec once per ratio when its eviction method names no ratio of its own (``snapkv``,
    ``snapkv:chunk=8@adakv+kivi:4``); a spec with a ratio, a token ``budget=`` or a fixed streaming ``window=``, or
    one that evicts nothing, as given."""
    for ratio in ratios:
        if not 0 <= ratio < 1:
            raise KVFoldError(f"ratio {ratio} is outside [0, 1): it is the fraction of tokens removed")
    compressors = []
    for spec in specs:
        first = spec.split("+")[0]
        base = Compressor.parse(spec)
        if not base.evicts or base.scorer.fixed_size or _names_ratio(first.split("@")[0]):
            compressors.append(base)
            continue
        name, at, rest = first.partition("@")
        method, _, knobs = name.partition(":")
        tail = spec[len(first):]
        compressors += [Compressor.parse(f"{method}:{r}{',' + knobs if knobs else ''}{at}{rest}{tail}")
                        for r in ratios]
    return list(dict.fromkeys(compressors))


def _names_ratio(method_text: str) -> bool:
    """True when the eviction part of a spec gives its ratio: a bare value or ``ratio=``."""
    items = [k.strip() for k in method_text.partition(":")[2].split(",") if k.strip()]
    return any("=" not in k or k.split("=")[0].strip() == "ratio" for k in items)


@dataclass
class Row:
    spec: str
    scores: list[float]
    kv_bytes: list[int]
    prefill: list[float]
    decode_tps: list[float]


def run_demo(model, tokenizer, compressors: list[Compressor], *, length: int, samples: int,
             agnostic: bool, console: Console, max_new_tokens: int = 24,
             prefill_chunk: int | None = None) -> list[Row]:
    depths = [0.1 + 0.8 * i / max(1, samples - 1) for i in range(samples)] if samples > 1 else [0.5]
    tasks = needle_samples(tokenizer, length=length, depths=depths, seed=0)
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        job = progress.add_task("needles", total=len(compressors) * len(tasks))
        for compressor in compressors:
            row = Row(compressor.spec, [], [], [], [])
            for sample in tasks:
                progress.update(job, description=f"{compressor.spec} · depth {sample.meta.get('depth', 0):.0%}")
                answer = generate(model, tokenizer, context=sample.context, question=sample.question,
                                  method=compressor, agnostic=agnostic, max_new_tokens=max_new_tokens,
                                  prefill_chunk=prefill_chunk)[0]
                row.scores.append(score_contains(answer.text, sample.answer))
                row.kv_bytes.append(answer.kv_bytes)
                row.prefill.append(answer.prefill_seconds)
                if answer.decode_seconds > 0:
                    row.decode_tps.append(len(answer.tokens) / answer.decode_seconds)
                progress.advance(job)
            rows.append(row)
    console.print(summary_table(rows, length, agnostic, prefill_chunk))
    return rows


def summary_table(rows: list[Row], length: int, agnostic: bool, prefill_chunk: int | None = None) -> Table:
    baseline = next((statistics.mean(r.kv_bytes) for r in rows if r.spec == "none"), None)
    setting = ("query-agnostic" if agnostic else "query-aware") + (f" · chunks of {prefill_chunk}" if prefill_chunk else "")
    table = Table(title=f"needle in a haystack · {length} tokens · {setting}")
    for column in ("method", "accuracy", "KV held", "vs none", "prefill s", "decode tok/s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        held = statistics.mean(row.kv_bytes)
        table.add_row(row.spec, f"{statistics.mean(row.scores):.0%}", f"{held / 2**20:.2f} MiB",
                      f"{held / baseline:.0%}" if baseline else "—", f"{statistics.mean(row.prefill):.2f}",
                      f"{statistics.mean(row.decode_tps):.1f}" if row.decode_tps else "—")
    return table


DEMO_NEW_TOKENS = 24  # the needle answers ("The special magic number for X is: 1234567.") fit


def run_demo_sweep(model, tokenizer, config, *, model_name: str, console: Console) -> tuple[object, dict[str, Path]]:
    """Run `config` (a :class:`~kvfold.bench.runner.BenchConfig`) with `kvfold bench` (resumable, in
    ``config.out``), print this sweep's summary and write its report next to the results; returns (report, paths)."""
    from .bench.report import Report, summary_grid
    from .bench.runner import run_bench

    rows = run_bench(model, tokenizer, config, model_name=model_name, console=console)
    report = Report(rows.path, tuple(rows), tuple(rows.warnings))
    paths = report.write(Path(config.out))
    title = f"kvfold demo · {model_name} · {', '.join(map(str, config.lengths))} tokens · {config.setting}"
    console.print(summary_grid(report, title=title).rich())
    console.print(f"{len(rows)} answers ({rows.computed} new) in {rows.path}; report: "
                  + ", ".join(str(p) for p in paths.values()))
    return report, paths
