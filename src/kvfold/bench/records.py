"""The benchmark's results file (`results.jsonl`: one JSON row per answered question, append-only, crash-safe),
the environment recorded in every row, per-sample peak memory, and the summary table.

A row is keyed by (model, method, ratio, task, length, setting, sample, question); its ``key`` field holds that
tuple as a compact JSON list, so a rerun can skip what is already there. Reading never fails on a bad line: a line
that is not a JSON object with the fields in :data:`REQUIRED` is reported by its 1-based number and ignored, so
its key is computed again and appended.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

REQUIRED: dict[str, type | tuple[type, ...]] = {
    "key": str, "model": str, "method": str, "task": str, "length": int, "setting": str, "sample": int,
    "question": int, "score": (int, float), "kv_bytes": int, "kv_bytes_uncompressed": int,
}
# Fields that must agree between a stored row and this run's for the same key (else the folder holds another run).
SAME_RUN = ("sample_hash", "max_new_tokens", "prefill_chunk", "dtype")


def make_key(model: str, method: str, ratio: float | None, task: str, length: int, setting: str, sample: int,
             question: int) -> str:
    """The row key: ``["model","method",ratio,"task",length,"setting",sample,question]`` as compact JSON."""
    return json.dumps([model, method, ratio, task, length, setting, sample, question], separators=(",", ":"),
                      ensure_ascii=False)


def _problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for name, kind in REQUIRED.items():
        if name not in row:
            return f"missing field '{name}'"
        if not isinstance(row[name], kind) or isinstance(row[name], bool):
            return f"field '{name}' has the wrong type ({type(row[name]).__name__})"
    return None


def read_results(path: Path, consequence: str = "its sample runs again") -> tuple[dict[str, dict], list[str]]:
    """The rows of ``path`` by key (a later line wins) and one warning per unusable line, naming its number and
    ending with ``consequence`` (what happens to it: the bench runs it again, the report leaves it out).

    Blank lines are ignored; a missing file is empty. Nothing is raised for the file's content.
    """
    rows: dict[str, dict] = {}
    warnings: list[str] = []
    if not path.is_file():
        return rows, warnings
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            truncated = not raw.endswith(b"\n")
            try:
                row = json.loads(raw.decode("utf-8"))
                problem = _problem(row)
            except UnicodeDecodeError:
                problem = "not valid UTF-8"
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
            if problem is None:
                rows[row["key"]] = row
            else:
                where = " (the last line, cut off: was the run killed while writing it?)" if truncated else ""
                warnings.append(f"{path}:{number}: skipped a bad line{where}: {problem}; {consequence}")
    return rows, warnings


class ResultsWriter:
    """Appends rows to the results file, each as one whole line, flushed and fsync'ed before `append` returns.

    A file that ends inside a line (a run killed mid-write) first gets a newline, so the cut line stays one bad
    line and the next row starts clean. Existing lines are never rewritten or removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("ab")
        if self.handle.tell() > 0:
            with path.open("rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def append(self, row: dict) -> None:
        self._write(json.dumps(row, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n")

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def git_revision(source: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the folder holding kvfold's source, or None (not a checkout, or no git)."""
    folder = source or Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    revision = done.stdout.strip()
    return revision if done.returncode == 0 and len(revision) == 40 else None


def environment(model) -> dict[str, Any]:
    """What every row records about where it ran: device, dtype and versions."""
    import transformers

    from .. import __version__

    device = next(model.parameters()).device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "dtype": str(model.dtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": transformers.__version__, "kvfold": __version__,
            "git_revision": git_revision()}


def uncompressed_bytes(model, tokens: int) -> int:
    """What a plain cache in the model's dtype holds for ``tokens`` tokens: 2 x layers x kv_heads x head_dim x
    element size x tokens (every layer counted in full, sliding-window layers included)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element * tokens


@dataclass
class PeakMemory:
    """Peak memory over a `with` block. CUDA: ``torch.cuda.max_memory_allocated`` after a reset (source
    "cuda_max_allocated"). CPU: the process's resident set size read from /proc/self/statm every ``interval``
    seconds by a thread, plus at entry and exit ("cpu_rss_sampled"); without /proc, the process-lifetime
    ``ru_maxrss`` ("cpu_ru_maxrss", not reset per sample)."""

    device: torch.device
    interval: float = 0.005
    bytes: int = 0
    source: str = ""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda_max_allocated"
        elif _rss() is not None:
            self.source, self.bytes = "cpu_rss_sampled", _rss() or 0
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="kvfold-rss", daemon=True)
            self._thread.start()
        else:
            self.source = "cpu_ru_maxrss"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, _rss() or 0)

    def __exit__(self, *exc: object) -> None:
        if self.source == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.bytes = max(self.bytes, _rss() or 0)
        else:
            scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 / 100 else f"{n / 2**10:.1f} KiB"


def summary_table(rows: Iterable[dict], title: str = "kvfold bench") -> Table:
    """Mean score (and row count) per method (and setting, when there are two) x task, then the mean KV held, the
    mean uncompressed cache for the same prompts ("KV plain") and their ratio; every length counts."""
    rows = list(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    both = len({r["setting"] for r in rows}) > 1
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["setting"] if both else ""), []).append(row)
    table = Table(title=title)
    table.add_column("method", no_wrap=True)
    if both:
        table.add_column("setting", no_wrap=True)
    for column in (*tasks, "KV held", "KV plain", "held %"):
        table.add_column(column, justify="right")
    for (method, setting), group in groups.items():
        scores = []
        for task in tasks:
            values = [r["score"] for r in group if r["task"] == task]
            scores.append(f"{statistics.mean(values):.0%} ({len(values)})" if values else "—")
        held = statistics.mean(r["kv_bytes"] for r in group)
        plain = statistics.mean(r["kv_bytes_uncompressed"] for r in group)
        table.add_row(method, *([setting] if both else []), *scores, _mib(held), _mib(plain),
                      f"{held / plain:.0%}" if plain else "—")
    return table
