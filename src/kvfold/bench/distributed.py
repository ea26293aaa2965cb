"""`kvfold bench --ray`: every (model, method) cell of a sweep runs as a Ray task on one GPU (or one CPU when the
cluster has none); the driver plans the sweep, appends each row to the one results file as it streams back, and
shows the same progress as an in-process run.

Each task is a Ray streaming generator: it loads the model once (:class:`ModelSource`), then yields a ``("start",
label, total)`` event per (task, length, setting) and a ``("row", row)`` event per answered question, exactly as
:func:`kvfold.bench.cells.cell_events` does in process, so rows written by Ray and by an in-process run are the
same except for timings, memory and timestamps. Resume and bad-line handling are the in-process ones (the driver
reads and writes the file; workers never touch it). Workers must have kvfold installed (same version) and see the
model (the embedded one ships with the wheel; a local path must exist on every node).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from ..errors import KVFoldError
from .cells import CellWork, cell_events, prompt_group
from .runner import BenchConfig, BenchRows, drive, plan_bench

INSTALL_HINT = "pip install 'kvfold[ray]'"


def require_ray():
    """The ``ray`` module, or a KVFoldError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise KVFoldError(f"--ray needs Ray, which is not installed: run `{INSTALL_HINT}` (or drop --ray to run "
                          "in this process)") from None
    return ray


@dataclass(frozen=True)
class ModelSource:
    """How the driver and each worker get the model: `name` as for ``kvfold.load_model`` (None = embedded).

    ``planning()`` gives the driver the model's config and tokenizer: for a Hub id or a folder without loading
    any weights; for the embedded model or a .gguf file by a full (cached, ~1 s) load. ``load()`` gives a worker
    the model on the GPU Ray assigned to it, else on the CPU.
    """

    name: str | None = None
    dtype: str = "float32"  # the workers' weights, whatever device Ray gives them

    def load(self) -> tuple[Any, Any]:
        import torch
        from transformers.utils import logging as hf_logging

        from ..models import load_model

        hf_logging.disable_progress_bar()  # one bar per worker would garble the driver's progress
        device = "cuda" if torch.cuda.is_available() else None  # Ray hides GPUs from tasks that asked for none
        return load_model(self.name, dtype=self.dtype, device=device)

    def planning(self) -> tuple[Any, Any]:
        from pathlib import Path

        from ..models import load_model

        path = Path(self.name).expanduser() if self.name is not None else None
        if path is None or path.is_file() or str(self.name).endswith(".gguf"):
            model, tokenizer = load_model(self.name, dtype=self.dtype)
            return model.config, tokenizer
        from transformers import AutoConfig, AutoTokenizer

        local = path.is_dir()
        try:
            config = AutoConfig.from_pretrained(self.name, local_files_only=local)
            tokenizer = AutoTokenizer.from_pretrained(self.name, local_files_only=local)
        except Exception:  # let load_model name the problem the usual way
            model, tokenizer = load_model(self.name)
            return model.config, tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        return config, tokenizer


@dataclass(frozen=True)
class RayOptions:
    """Where to run: ``address`` of a running cluster (None: a new local one, or the one ``ray.init`` already
    connected to), and extra keyword arguments for ``ray.init`` (e.g. ``num_cpus=2`` in tests)."""

    address: str | None = None
    init: tuple[tuple[str, Any], ...] = ()


def _bench_cells(source, config: BenchConfig, work: list[CellWork], model_name: str) -> Iterator[tuple]:
    """One Ray task: load the model, then answer `work` (the cells of one method), yielding events."""
    model, tokenizer = source.load()
    yield from cell_events(model, tokenizer, config, work, model_name)


def ray_events(source, config: BenchConfig, work: list[CellWork], model_name: str,
               options: RayOptions = RayOptions()) -> Iterator[tuple]:
    """Submit one task per method (all its cells; with a shared prefill, one per task × length × setting) and
    yield their events as they arrive, from whichever task produced one. Starts Ray when it is not running (and
    shuts it down after); cancels unfinished tasks when the consumer stops early (Ctrl-C, an error)."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        kwargs = {"include_dashboard": False, "configure_logging": False, **dict(options.init)}
        try:
            ray.init(address=options.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise KVFoldError(f"cannot start or reach Ray at {options.address or 'a new local cluster'} ({error}): "
                              "check --ray-address (e.g. ray://host:10001 or auto)") from error
    generators: list = []
    try:
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        remote = ray.remote(num_gpus=1, num_cpus=1)(_bench_cells) if gpus else ray.remote(num_cpus=1)(_bench_cells)
        groups: dict[object, list[CellWork]] = {}
        for item in work:  # a shared prefill serves the cells of one prompt group: they go to one task
            groups.setdefault(prompt_group(item.cell) if config.shared_prefill else item.cell.method, []).append(item)
        generators = [remote.remote(source, config, items, model_name) for items in groups.values()]
        pending = list(generators)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for generator in ready:
                try:
                    ref = next(generator)
                except StopIteration:
                    continue
                yield _get(ray, ref)
                pending.append(generator)
        generators = []
    finally:
        for generator in generators:
            try:
                ray.cancel(generator, force=True)
            except Exception:  # noqa: BLE001 - best effort: a finished task cannot be cancelled
                pass
        if started:
            ray.shutdown()


def _get(ray, ref):
    """``ray.get``, turning a worker's KVFoldError back into one (its message, not a remote traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, KVFoldError):
            raise KVFoldError(str(cause)) from None
        raise


def run_bench_ray(source, config: BenchConfig, *, model_name: str, options: RayOptions = RayOptions(),
                  on_row: Callable[[dict], None] | None = None, progress: bool | None = None,
                  console: Console | None = None) -> BenchRows:
    """`run_bench` with the cells on Ray workers: plan with ``source.planning()`` (config and tokenizer), run
    each method's cells as one task that calls ``source.load()``, append rows as they stream back.
    `source` is a :class:`ModelSource` or any picklable object with those two methods."""
    require_ray()
    model_config, tokenizer = source.planning()
    plan = plan_bench(model_config, tokenizer, config, model_name=model_name, console=console,
                      dtype=getattr(source, "dtype", "float32"))
    work = plan.work()
    events = ray_events(source, config, work, model_name, options) if work else iter(())
    return drive(plan, events, on_row=on_row, progress=progress, console=console)
