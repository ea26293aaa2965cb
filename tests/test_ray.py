"""`kvfold bench --ray`: a local Ray with 2 CPU workers runs a tiny sweep and writes the same rows as the in-process
run (timings, memory and timestamps aside); resume and bad lines work the same; without Ray, a clear error."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from rich.console import Console

from kvfold import cli
from kvfold.bench.runner import BenchConfig, run_bench
from kvfold.errors import KVFoldError

VOLATILE = {"prefill_seconds", "decode_seconds", "decode_tokens_per_second", "peak_memory_bytes", "timestamp"}
SWEEP = dict(methods=("none", "snapkv"), ratios=(0.5,), tasks=("niah", "multiturn"), lengths=(400,), samples=1,
             setting="both", max_new_tokens=4)
ROWS = 2 * 2 * (1 + 4)  # (none, snapkv:0.5) x (aware, agnostic) x (niah 1 question + multiturn 4)


def tiny_model(vocab: int):
    """A tiny random Llama, the same in every process (seeded); a wide init keeps greedy tokens off near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=4096,
                         initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


class TinySource:
    """A model source Ray can ship: the tokenizer travels with it, the model is rebuilt from its seed."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def planning(self):
        return tiny_model(len(self.tokenizer)).config, self.tokenizer

    def load(self):
        return tiny_model(len(self.tokenizer)), self.tokenizer


def stable(rows):
    return {r["key"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def stored(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests package
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_ray_and_in_process_runs_give_the_same_rows(ray_local, embedded_tokenizer, tmp_path):
    from kvfold.bench.distributed import RayOptions, run_bench_ray

    source, quiet = TinySource(embedded_tokenizer), Console(file=io.StringIO())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers (1 CPU each): the same float sums, the same greedy tokens
    try:
        local = run_bench(source.load()[0], embedded_tokenizer, BenchConfig(out=tmp_path / "local", **SWEEP),
                          model_name="tiny", progress=False, console=quiet)
    finally:
        torch.set_num_threads(threads)
    seen: list[str] = []
    remote = run_bench_ray(source, BenchConfig(out=tmp_path / "ray", **SWEEP), model_name="tiny",
                           options=RayOptions(), on_row=lambda row: seen.append(row["key"]), progress=False,
                           console=quiet)
    assert len(local) == len(remote) == remote.computed == ROWS and remote.warnings == []
    assert stable(remote) == stable(local)
    assert [r["key"] for r in remote] == [r["key"] for r in local]  # returned in plan order
    path = tmp_path / "ray" / "results.jsonl"
    assert sorted(seen) == sorted(r["key"] for r in stored(path)) and len(seen) == ROWS  # streamed, one line each
    assert stable(stored(path)) == stable(local)

    # resume: nothing left to do runs no task; a bad line is reported by number and only its key runs again
    again = run_bench_ray(source, BenchConfig(out=tmp_path / "ray", **SWEEP), model_name="tiny", progress=False,
                          console=quiet)
    assert again.computed == 0 and stable(again) == stable(local)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[5] = lines[5][:30]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    printed = io.StringIO()
    fixed = run_bench_ray(source, BenchConfig(out=tmp_path / "ray", **SWEEP), model_name="tiny", progress=False,
                          console=Console(file=printed, width=300))
    assert fixed.computed == 1 and len(fixed.warnings) == 1 and "results.jsonl:6:" in printed.getvalue()
    assert stable(fixed) == stable(local)


def test_a_worker_error_comes_back_as_the_same_error(ray_local, embedded_tokenizer, tmp_path):
    from kvfold.bench.distributed import run_bench_ray

    class Broken(TinySource):
        def load(self):
            raise KVFoldError("the weights are gone: reinstall them")

    with pytest.raises(KVFoldError, match="the weights are gone: reinstall them"):
        run_bench_ray(Broken(embedded_tokenizer), BenchConfig(out=tmp_path, **{**SWEEP, "methods": ("none",)}),
                      model_name="tiny", progress=False, console=Console(file=io.StringIO()))
    assert not (tmp_path / "results.jsonl").read_text()  # nothing half-written


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    from kvfold.bench.distributed import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(KVFoldError, match=r"pip install 'kvfold\[ray\]'"):
        require_ray()
    monkeypatch.setattr(cli, "_load",
                        lambda model, device, dtype: pytest.fail("the model must not load before the Ray check"))
    monkeypatch.setattr(sys, "argv", ["kvfold", "bench", "--ray", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        cli.run()
    err = capsys.readouterr().err
    assert done.value.code == 2 and "pip install 'kvfold[ray]'" in err and len(err.strip().splitlines()) == 1


def test_a_shared_prefill_on_ray_runs_one_task_per_prompt_group_with_the_same_rows(ray_local, embedded_tokenizer,
                                                                                   tmp_path):
    """`shared_prefill` on Ray: the cells of one (task, length, setting) go to one worker, which prefills each
    prompt once for both methods; the rows are the in-process run's."""
    from kvfold.bench.distributed import run_bench_ray

    source, quiet = TinySource(embedded_tokenizer), Console(file=io.StringIO())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_bench(source.load()[0], embedded_tokenizer, BenchConfig(out=tmp_path / "local", **SWEEP),
                          model_name="tiny", progress=False, console=quiet)
    finally:
        torch.set_num_threads(threads)
    remote = run_bench_ray(source, BenchConfig(out=tmp_path / "ray", shared_prefill=True, **SWEEP), model_name="tiny",
                           progress=False, console=quiet)
    assert remote.computed == ROWS and {r["prefill"] for r in remote} == {"shared"}
    mine = {k: {n: v for n, v in row.items() if n != "prefill"} for k, row in stable(remote).items()}
    theirs = {k: {n: v for n, v in row.items() if n != "prefill"} for k, row in stable(local).items()}
    assert mine == theirs
