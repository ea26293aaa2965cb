"""`kvfold bench`: run methods x ratios x tasks x lengths x settings on one model and append every answered question
to ``DIR/results.jsonl`` (see :mod:`.records`); rerunning the same command resumes where it stopped.

Cells: each method spec is expanded with the ratios as ``kvfold demo`` does (``snapkv`` + 0.5,0.75 gives
``snapkv:0.5`` and ``snapkv:0.75``); a spec that already names its ratio, or that evicts nothing (``none``,
``kivi:4``), runs once, with ``ratio`` null. Each cell answers ``samples`` seeded samples of its task; a multi-turn
sample asks every question: query-aware, each question is its own prompt compressed with the context;
query-agnostic, the context is compressed once and each question is asked on a fork (`generate(agnostic=True)`).

A run is planned (:func:`plan_bench`: samples, keys, what the file already holds), then driven (:func:`drive`: rows
appended as they arrive, with progress bars) from events that :func:`kvfold.bench.cells.cell_events` produces in
this process or, with ``--ray``, on Ray workers (:mod:`.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..api import check_chunk, split_prompt
from ..compressor import Compressor
from ..demo import expand_specs
from ..errors import KVFoldError, closest
from ..models import context_limit
from .cells import Cell, CellWork, cell_events, method_ratio, sample_hash  # noqa: F401  (method_ratio: re-exported)
from .records import SAME_RUN, ResultsWriter, read_results
from .tasks import TASKS, make_samples

SETTINGS: dict[str, tuple[str, ...]] = {"aware": ("aware",), "agnostic": ("agnostic",), "both": ("aware", "agnostic")}
RESULTS_FILE = "results.jsonl"


def split_specs(text: str) -> list[str]:
    """Comma-separated method specs, where a knob list's own commas stay in its spec:
    ``"none,streaming:sink=4,window=512,snapkv"`` -> ``["none", "streaming:sink=4,window=512", "snapkv"]``."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first = part.replace("@", "+").split("+")[0]
        if specs and ((":" not in first and "=" in first) or _is_number(first)):
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_list(text: str, cast: type, flag: str) -> list:
    """``"2048,6144"`` -> [2048, 6144]; a bad item is a KVFoldError naming the flag."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [cast(p) for p in items]
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise KVFoldError(f"{flag} takes comma-separated {kind}, got '{text}'") from None


def _tuple(value: object, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise KVFoldError(f"{name} must be a list, got {value!r}")
    if not value:
        raise KVFoldError(f"{name} is empty: give at least one")
    return tuple(dict.fromkeys(value))


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """A validated sweep. ``methods``/``tasks``: lists (a ``str`` is split at commas); ``ratios``: eviction ratios in
    [0, 1) for specs without their own; ``setting``: aware | agnostic | both. Results go to ``out/results.jsonl``."""

    out: str | Path
    methods: Sequence[str] = ("none", "snapkv")
    ratios: Sequence[float] = (0.5,)
    tasks: Sequence[str] = ("niah",)
    lengths: Sequence[int] = (2048,)
    samples: int = 3
    setting: str = "aware"
    prefill_chunk: int | None = None
    max_new_tokens: int = 32
    seed: int = 0
    fast: bool = False  # decode with the fast loop (same greedy tokens; faster on a GPU)
    shared_prefill: bool = False  # one prompt forward for every method (`kvfold.replay`; same rows)
    compressors: tuple[Compressor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        if self.out is None or not str(self.out).strip():
            raise KVFoldError("no output folder: pass --out DIR (out=...); results go to DIR/results.jsonl and "
                              "running the same command again resumes")
        put("out", Path(self.out))
        put("methods", _tuple(split_specs(self.methods) if isinstance(self.methods, str) else self.methods,
                              "methods"))
        put("ratios", _tuple(self.ratios, "ratios"))
        for ratio in self.ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
                raise KVFoldError(f"ratio {ratio!r} is not a number in [0, 1)")
        put("tasks", _tuple(self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks, "tasks"))
        for task in self.tasks:
            if task not in TASKS:
                raise KVFoldError(f"unknown task {task!r}{closest(str(task), TASKS)}; valid: {', '.join(TASKS)}")
        put("lengths", _tuple(self.lengths, "lengths"))
        for length in self.lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
                raise KVFoldError(f"length {length!r} must be a positive number of tokens")
        for name in ("samples", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVFoldError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise KVFoldError(f"seed must be an integer, got {self.seed!r}")
        if self.setting not in SETTINGS:
            raise KVFoldError(f"unknown setting {self.setting!r}{closest(str(self.setting), SETTINGS)}; "
                              f"valid: {', '.join(SETTINGS)}")
        check_chunk(self.prefill_chunk)
        if not isinstance(self.fast, bool):
            raise KVFoldError(f"fast must be True or False, got {self.fast!r}")
        if not isinstance(self.shared_prefill, bool):
            raise KVFoldError(f"shared_prefill must be True or False, got {self.shared_prefill!r}")
        if self.shared_prefill and self.prefill_chunk is not None:
            raise KVFoldError("a shared prefill needs one-pass prefills (each chunk of a chunked prefill attends to "
                              "what the method kept of the ones before): drop --prefill-chunk or --shared-prefill")
        for spec in self.methods:
            if not isinstance(spec, str):
                raise KVFoldError(f"a method spec must be a string, got {spec!r}")
        put("compressors", tuple(expand_specs(list(self.methods), [float(r) for r in self.ratios])))

    def check_context(self, limit: int) -> None:
        """Every length plus ``max_new_tokens`` must fit in the model's context of ``limit`` tokens."""
        for length in self.lengths:
            if length + self.max_new_tokens > limit:
                raise KVFoldError(f"length {length} + max_new_tokens {self.max_new_tokens} passes the model's context "
                                  f"of {limit} tokens: use lengths up to {limit - self.max_new_tokens}")

    def cells(self) -> list[Cell]:
        """Method x task x length x setting, in that nesting order."""
        return [Cell(c, t, n, s) for c in self.compressors for t in self.tasks for n in self.lengths
                for s in SETTINGS[self.setting]]


class BenchRows(list):
    """`run_bench`'s rows (this sweep's, stored earlier or computed now, in cell order) with ``path`` (the
    results file), ``warnings`` (one per bad line skipped) and ``computed`` (rows appended by this run)."""

    def __init__(self, rows: list[dict], path: Path, warnings: list[str], computed: int) -> None:
        super().__init__(rows)
        self.path, self.warnings, self.computed = path, warnings, computed


@dataclass
class Plan:
    """A sweep checked against the results file: every key of every cell (in cell order), the rows already stored
    (``done``, by key), the warnings about bad lines, and the work left (:meth:`work`)."""

    config: BenchConfig
    model_name: str
    path: Path
    keys: dict[Cell, list[list[str]]]
    done: dict[str, dict]
    warnings: list[str]
    _work: dict[Cell, CellWork]

    @property
    def all_keys(self) -> list[str]:
        return [key for keys in self.keys.values() for sample_keys in keys for key in sample_keys]

    def work(self) -> list[CellWork]:
        """The cells with questions left, in cell order (a cell fully stored is left out)."""
        return [w for w in self._work.values() if w.total]


def plan_bench(model_config, tokenizer, config: BenchConfig, *, model_name: str,
               console: Console | None = None, dtype: str = "float32") -> Plan:
    """Generate the sweep's samples, check every prompt fits ``model_config``'s context, read the results file
    (bad lines are warned about on `console` by line number) and refuse stored rows of another run for our keys
    (`dtype`: the model's, e.g. "bfloat16"; rows of another precision are another run)."""
    console = console or Console(stderr=True)
    limit = context_limit(model_config)
    config.check_context(limit)
    path = Path(config.out) / RESULTS_FILE
    done, warnings = read_results(path)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    samples = {(t, n): make_samples(t, tokenizer, length=n, samples=config.samples, seed=config.seed)
               for t in config.tasks for n in config.lengths}
    prompts = {(t, n): [tuple(sum(map(len, split_prompt(tokenizer, s.context, q))) for q in s.questions)
                        for s in group] for (t, n), group in samples.items()}
    for (task, length), group in prompts.items():
        longest = max(max(p) for p in group)
        if longest + config.max_new_tokens > limit:
            raise KVFoldError(f"{task} at length {length}: the prompt has {longest} tokens (context, question and "
                              f"chat template) + max_new_tokens {config.max_new_tokens} > the model's context of "
                              f"{limit}: use a smaller length")
    hashes = {k: [sample_hash(s) for s in group] for k, group in samples.items()}
    keys = {cell: [[cell.key(model_name, i, q) for q in range(len(s.questions))]
                   for i, s in enumerate(samples[cell.task, cell.length])] for cell in config.cells()}
    for cell, cell_keys in keys.items():
        for i, key in ((i, key) for i, sample_keys in enumerate(cell_keys) for key in sample_keys if key in done):
            ours = {"sample_hash": hashes[cell.task, cell.length][i], "max_new_tokens": config.max_new_tokens,
                    "prefill_chunk": config.prefill_chunk, "dtype": dtype}
            for name in SAME_RUN:
                if done[key].get(name) != ours[name]:
                    raise KVFoldError(
                        f"{path} already has {cell.method} · {cell.task} · {cell.length} · sample {i} from another "
                        f"run ({name} {done[key].get(name)!r}, this run {ours[name]!r}; seed and samples change the "
                        "samples): pass another --out, or the settings of that run (--dtype for dtype)")
    work = {cell: CellWork(cell, tuple(samples[cell.task, cell.length]), tuple(prompts[cell.task, cell.length]),
                           tuple(hashes[cell.task, cell.length]),
                           tuple(tuple(q for q, key in enumerate(sample_keys) if key not in done)
                                 for sample_keys in cell_keys))
            for cell, cell_keys in keys.items()}
    return Plan(config, model_name, path, keys, done, warnings, work)


def run_bench(model, tokenizer, config: BenchConfig, *, model_name: str, on_row: Callable[[dict], None] | None = None,
              progress: bool | None = None, console: Console | None = None) -> BenchRows:
    """Run every missing (sample, question) of `config`'s cells in this process and append its row to
    ``out/results.jsonl``.

    Keys already in the file are skipped (resume). Bad lines are warned about on `console` (default: stderr) by
    line number and their keys run again. A stored row for one of this sweep's keys that came from other
    settings (another seed or sample count, max_new_tokens or prefill_chunk) is an error: use another folder.
    `on_row(row)` is called after each row is safely written. `progress`: Rich bars (None = when on a terminal).
    For Ray, see :func:`kvfold.bench.distributed.run_bench_ray`: same plan, same rows, cells on workers.
    """
    plan = plan_bench(model.config, tokenizer, config, model_name=model_name, console=console,
                      dtype=str(model.dtype).removeprefix("torch."))
    events = cell_events(model, tokenizer, config, plan.work(), model_name)
    return drive(plan, events, on_row=on_row, progress=progress, console=console)


def _accuracy(values: list[float]) -> str:
    return f"acc {sum(values) / len(values):.0%} of {len(values)}" if values else "acc —"


@contextmanager
def closing_events(events: Iterable[tuple]) -> Iterator[None]:
    """Close a generator of events when the driver stops early (Ctrl-C, an error), so that its clean-up (e.g.
    cancelling Ray tasks) runs now rather than at garbage collection."""
    try:
        yield
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def drive(plan: Plan, events: Iterable[tuple], *, on_row: Callable[[dict], None] | None = None,
          progress: bool | None = None, console: Console | None = None) -> BenchRows:
    """Append each ``("row", row)`` event's row to the results file as it arrives (flushed, fsync'ed), with Rich
    bars: one overall (ETA, running accuracy of every row of the sweep, resumed ones included) and one per running
    cell (its own accuracy), created at the cell's ``("start", label, total)`` event and removed when it is done."""
    console = console or Console(stderr=True)
    done, all_keys = plan.done, plan.all_keys
    scores = [done[key]["score"] for key in all_keys if key in done]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    enabled = console.is_terminal if progress is None else bool(progress)
    computed, live = 0, {}
    resumed = f" · {len(scores)} resumed" if scores else ""
    with ResultsWriter(plan.path) as writer, Progress(*columns, console=console, disable=not enabled) as bars, \
            closing_events(events):
        overall = bars.add_task(f"bench{resumed} · {_accuracy(scores)}", total=len(all_keys) - len(scores))
        for event in events:
            if event[0] == "start":
                _, label, total = event
                live[label] = (bars.add_task(label, total=total), [], total)
                continue
            row = event[1]
            writer.append(row)
            done[row["key"]] = row
            computed += 1
            scores.append(row["score"])
            label = f"{row['method']} · {row['task']} · {row['length']} · {row['setting']}"
            if label in live:
                bar, cell_scores, total = live[label]
                cell_scores.append(row["score"])
                bars.update(bar, advance=1, description=f"{label} · {_accuracy(cell_scores)}")
                if len(cell_scores) == total:
                    bars.remove_task(bar)
                    del live[label]
            bars.update(overall, advance=1, description=f"bench{resumed} · {_accuracy(scores)}")
            if on_row is not None:
                on_row(row)
    rows = [done[key] for key in all_keys if key in done]
    return BenchRows(rows, plan.path, plan.warnings, computed)


