"""`kvfold bench`: rows per (sample, question), crash-safe append-only results, resume, bad lines, validation, CLI.

A tiny random Llama with the embedded tokenizer's vocabulary answers nonsense (scores ~0); what is tested is the
machinery, not accuracy.
"""

from __future__ import annotations

import io
import json
import mmap
import re
import shutil
import sys
import time
from datetime import datetime

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from kvfold import cli
from kvfold.bench.records import PeakMemory, read_results
from kvfold.bench.runner import BenchConfig, plan_bench, run_bench, split_specs
from kvfold.errors import KVFoldError

FIELDS = {
    "key": str, "model": str, "method": str, "ratio": (float, type(None)), "task": str, "metric": str,
    "length": int, "setting": str, "sample": int, "question": int, "questions": int, "seed": int, "sample_seed": int,
    "sample_hash": str, "question_text": str, "answer": (str, list), "prediction": str, "score": float,
    "context_tokens": int, "prompt_tokens": int, "new_tokens": int, "kv_bytes": int, "kv_bytes_uncompressed": int,
    "peak_memory_bytes": int, "peak_memory_source": str, "prefill_seconds": float, "decode_seconds": float,
    "decode_tokens_per_second": (float, type(None)), "max_new_tokens": int, "prefill_chunk": (int, type(None)), "fast_decode": bool, "prefill": str,
    "device": str, "device_name": str, "dtype": str, "torch": str, "transformers": str, "kvfold": str,
    "git_revision": (str, type(None)), "timestamp": str,
}
SWEEP = dict(methods=("none", "snapkv"), ratios=(0.5, 0.75), tasks=("niah", "multiturn"), lengths=(400,), samples=2,
             setting="both", max_new_tokens=4)
ROWS = 3 * 2 * (2 * 1 + 2 * 4)  # (none, snapkv:0.5, snapkv:0.75) x (aware, agnostic) x (niah 2x1 + multiturn 2x4)


@pytest.fixture(scope="module")
def tok(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="module")
def lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=4096,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def bench(lm, tok, out, **overrides):
    config = BenchConfig(out=out, **{**SWEEP, **overrides})
    return run_bench(lm, tok, config, model_name="tiny", progress=False, console=Console(file=io.StringIO()))


def lines(path):
    return path.read_bytes().decode("utf-8").splitlines()


def fingerprint(rows):
    return {r["key"]: (r["score"], r["prediction"], r["kv_bytes"], r["kv_bytes_uncompressed"]) for r in rows}


@pytest.fixture(scope="module")
def full(lm, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return bench(lm, tok, out), out / "results.jsonl"


def test_one_row_per_sample_and_question_with_every_field(full):
    rows, path = full
    stored = [json.loads(line) for line in lines(path)]
    assert len(rows) == len(stored) == ROWS and rows.computed == ROWS and rows.warnings == []
    assert rows == stored and len({r["key"] for r in stored}) == ROWS
    assert {(r["method"], r["ratio"]) for r in rows} == {("none", None), ("snapkv:0.5", 0.5), ("snapkv:0.75", 0.75)}
    assert {(r["task"], r["question"]) for r in rows} == {("niah", 0), *{("multiturn", q) for q in range(4)}}
    for row in rows:
        assert set(row) == set(FIELDS), set(row) ^ set(FIELDS)
        for name, kind in FIELDS.items():
            assert isinstance(row[name], kind) and (kind is bool or not isinstance(row[name], bool)), (name, row[name])
        assert json.loads(row["key"]) == [row[k] for k in ("model", "method", "ratio", "task", "length", "setting",
                                                           "sample", "question")]
        assert 0 <= row["score"] <= 1 and row["model"] == "tiny" and row["length"] == 400
        assert 336 <= row["context_tokens"] <= 400 < row["prompt_tokens"] < 500
        assert row["questions"] == (4 if row["task"] == "multiturn" else 1)
        assert 1 <= row["new_tokens"] <= 4 and row["decode_tokens_per_second"] > 0
        assert row["prefill_seconds"] > 0 and row["decode_seconds"] > 0
        assert row["peak_memory_bytes"] > 10 * 2**20 and row["peak_memory_source"] == "cpu_rss_sampled"
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["torch"] == torch.__version__
        assert row["git_revision"] is None or len(row["git_revision"]) == 40
        assert row["prefill_chunk"] is None and row["max_new_tokens"] == 4 and row["seed"] == 0
        assert row["fast_decode"] is False
        assert datetime.fromisoformat(row["timestamp"]).tzinfo is not None
        # 2 (K, V) x 2 layers x 2 KV heads x head_dim 16 x 4 bytes per prompt token
        assert row["kv_bytes_uncompressed"] == 512 * row["prompt_tokens"]
        share = row["kv_bytes"] / row["kv_bytes_uncompressed"]
        if row["method"] == "none":
            assert 1 <= share < 1.3, share  # pages of 64 tokens, decoded tokens and the agnostic fork's own pages
        else:
            assert share < 0.8, share
    held = {(r["method"], r["task"], r["setting"], r["sample"], r["question"]): r["kv_bytes"] for r in rows}
    for (method, *where), kv_bytes in held.items():
        if method == "snapkv:0.75":
            assert kv_bytes < held["snapkv:0.5", *where] < held["none", *where]
    multiturn = [r for r in rows if r["task"] == "multiturn" and r["sample"] == 0 and r["method"] == "none"]
    assert len({r["answer"] for r in multiturn}) == 4 and len({r["question_text"] for r in multiturn}) == 4


def test_a_shared_prefill_gives_the_same_rows(lm, tok, full, tmp_path):
    """`shared_prefill`: each prompt's forward once for every method (query-aware: per question; agnostic: per
    sample), the same scores, predictions and bytes as every method prefilling on its own; rows say which."""
    rows, _ = full
    shared = bench(lm, tok, tmp_path, shared_prefill=True)
    assert shared.computed == ROWS and fingerprint(shared) == fingerprint(rows)
    assert {r["prefill"] for r in shared} == {"shared"} and {r["prefill"] for r in rows} == {"own"}
    assert all(r["prefill_seconds"] > 0 and r["peak_memory_bytes"] > 0 for r in shared)


def test_interrupted_runs_leave_valid_jsonl_and_resume_to_the_same_rows(lm, tok, full, tmp_path):
    seen = []

    def stop_after(k):
        def hook(row):
            seen.append(row["key"])
            if len(seen) == k:
                raise KeyboardInterrupt
        return hook

    path = tmp_path / "results.jsonl"
    # 7 rows: inside a query-aware multi-turn sample; 14: inside a query-agnostic one (all its questions ran at once)
    for k in (7, 14):
        with pytest.raises(KeyboardInterrupt):
            config = BenchConfig(out=tmp_path, **SWEEP)
            run_bench(lm, tok, config, model_name="tiny", on_row=stop_after(k), progress=False,
                      console=Console(file=io.StringIO()))
        assert [json.loads(line)["key"] for line in lines(path)] == seen  # whole lines, nothing after the hook
    rows = bench(lm, tok, tmp_path)
    assert rows.computed == ROWS - 14 and rows.warnings == []
    assert len(lines(path)) == ROWS and fingerprint(rows) == fingerprint(full[0])
    again = bench(lm, tok, tmp_path)
    assert again.computed == 0 and len(lines(path)) == ROWS and again == rows


def test_bad_lines_are_reported_skipped_and_recomputed(lm, tok, full, tmp_path):
    good = lines(full[1])
    cut = json.loads(good[13])
    assert (cut["method"], cut["task"], cut["setting"], cut["question"]) == ("none", "multiturn", "agnostic", 1)
    broken = list(good)
    broken[2] = "this is not json"
    broken[13] = good[13][: len(good[13]) // 2]  # cut: question 1 of a query-agnostic multi-turn sample
    broken[20] = json.dumps({k: v for k, v in json.loads(good[20]).items() if k != "kv_bytes"})
    broken.insert(30, "")  # blank lines are not data: no warning
    text = "\n".join(broken[:-1]) + "\n" + broken[-1][:40]  # the last line cut off, no newline: a killed run
    path = tmp_path / "results.jsonl"
    path.write_text(text, encoding="utf-8")
    printed = io.StringIO()
    config = BenchConfig(out=tmp_path, **SWEEP)
    rows = run_bench(lm, tok, config, model_name="tiny", progress=False, console=Console(file=printed, width=300))
    numbers = [3, 14, 21, ROWS + 1]
    assert len(rows.warnings) == 4
    for number, warning in zip(numbers, rows.warnings):
        assert f"results.jsonl:{number}:" in warning and f"results.jsonl:{number}:" in printed.getvalue()
    assert "invalid JSON" in rows.warnings[0] and "missing field 'kv_bytes'" in rows.warnings[2]
    assert "cut off" in rows.warnings[3]
    assert rows.computed == 4 and fingerprint(rows) == fingerprint(full[0])
    after = path.read_text(encoding="utf-8")
    assert after.startswith(text + "\n")  # the user's lines are untouched; the cut line only got its newline
    recomputed = [json.loads(line)["key"] for line in after[len(text) + 1:].splitlines()]
    assert sorted(recomputed) == sorted(json.loads(good[i])["key"] for i in (2, 13, 20, len(good) - 1))
    stored, warnings = read_results(path)
    assert len(stored) == ROWS and len(warnings) == 4


def test_same_config_gives_the_same_predictions(lm, tok, tmp_path):
    small = dict(methods=("snapkv:0.5+kivi:4", "streaming"), ratios=(0.5,), tasks=("multikey",), samples=2,
                 setting="aware")
    first, second = bench(lm, tok, tmp_path / "a", **small), bench(lm, tok, tmp_path / "b", **small)
    assert len(first) == 4 and fingerprint(first) == fingerprint(second)
    assert [r["prediction"] for r in first] == [r["prediction"] for r in second]
    fast = bench(lm, tok, tmp_path / "fast", fast=True, **small)  # the fast decode loop: the same answers
    assert [(r["prediction"], r["score"]) for r in fast] == [(r["prediction"], r["score"]) for r in first]
    assert all(r["fast_decode"] for r in fast)


def test_rows_of_other_settings_in_the_folder_are_an_error(lm, tok, full, tmp_path):
    shutil.copy(full[1], tmp_path / "results.jsonl")
    with pytest.raises(KVFoldError, match="max_new_tokens 4, this run 5.*another --out"):
        bench(lm, tok, tmp_path, max_new_tokens=5)
    with pytest.raises(KVFoldError, match="sample_hash"):
        bench(lm, tok, tmp_path, seed=1)
    plan = dict(model_name="tiny", dtype="bfloat16", console=Console(file=io.StringIO()))  # the rows ran in float32
    with pytest.raises(KVFoldError, match="dtype 'float32', this run 'bfloat16'.*--dtype"):
        plan_bench(lm.config, tok, BenchConfig(out=tmp_path, **SWEEP), **plan)
    assert lines(tmp_path / "results.jsonl") == lines(full[1])


@pytest.mark.parametrize("overrides, message", [
    (dict(tasks=("nia",)), "unknown task 'nia' (did you mean 'niah'?)"),
    (dict(ratios=(1.0,)), "ratio 1.0 is outside [0, 1)"),
    (dict(ratios=(0.5, -0.1)), "outside [0, 1)"),
    (dict(methods=("snapk",)), "unknown method 'snapk' (did you mean 'snapkv'?)"),
    (dict(methods=("snapkv:0.5+",)), "empty method name"),
    (dict(methods=()), "methods is empty"),
    (dict(lengths=(0,)), "length 0 must be a positive number of tokens"),
    (dict(samples=0), "samples must be a positive integer"),
    (dict(setting="agnostc"), "did you mean 'agnostic'"),
    (dict(prefill_chunk=0), "prefill_chunk must be a positive number"),
    (dict(fast="yes"), "fast must be True or False"),
    (dict(shared_prefill=True, prefill_chunk=128), "drop --prefill-chunk or --shared-prefill"),
    (dict(out=None), "--out"),
])
def test_bad_configs_are_clear_errors(overrides, message, tmp_path):
    with pytest.raises(KVFoldError) as error:
        BenchConfig(**{"out": tmp_path, **SWEEP, **overrides})
    assert message in str(error.value)


def test_lengths_past_the_model_context_are_refused_before_anything_runs(lm, tok, tmp_path):
    config = BenchConfig(out=tmp_path, **{**SWEEP, "lengths": (4095,)})
    with pytest.raises(KVFoldError, match="passes the model's context of 4096 tokens: use lengths up to 4092"):
        config.check_context(4096)
    with pytest.raises(KVFoldError, match="model's context of 4096"):
        run_bench(lm, tok, config, model_name="tiny", progress=False)
    # the prompt (context + question + template) is checked too, not only the requested length
    with pytest.raises(KVFoldError, match="niah at length 4090: the prompt has"):
        bench(lm, tok, tmp_path, lengths=(4090,), tasks=("niah",))
    assert not (tmp_path / "results.jsonl").exists()


def test_split_specs_keeps_knob_lists_together():
    text = "none, streaming:sink=4,window=512,snapkv:0.5,window=64+kivi:4,adakv,kivi:2"
    assert split_specs(text) == ["none", "streaming:sink=4,window=512", "snapkv:0.5,window=64+kivi:4", "adakv",
                                 "kivi:2"]


def test_peak_memory_on_the_cpu_sees_a_short_lived_allocation():
    with PeakMemory(torch.device("cpu")) as before:
        pass
    with PeakMemory(torch.device("cpu")) as memory:
        # A fresh anonymous mapping, touched page by page: a tensor could reuse heap pages that are
        # already resident from earlier tests, and then the RSS would not move.
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))
        time.sleep(0.2)
        block.close()
    assert memory.source == "cpu_rss_sampled" and memory.bytes >= before.bytes + 48 * 2**20


def test_cli_bench_without_out_is_one_line_and_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kvfold", "bench", "--tasks", "niah"])
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bench_runs_resumes_and_prints_a_summary(lm, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda model, device, dtype: (lm, tok))
    args = ["bench", "--methods", "none,snapkv", "--ratios", "0.5", "--tasks", "niah,multiturn", "--lengths", "400",
            "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path), "--setting", "agnostic"]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "niah" in result.output and "multiturn" in result.output and "snapkv:0.5" in result.output
    assert "KV held" in result.output and "10 rows (10 new)" in result.output
    assert str(tmp_path / "results.jsonl") in result.output.replace("\n", "")
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "10 rows (0 new)" in result.output
    result = CliRunner().invoke(cli.app, [*args[:-2], "--setting", "sideways"])
    assert isinstance(result.exception, KVFoldError) and "valid: aware, agnostic, both" in str(result.exception)


def test_progress_shows_overall_and_cell_bars_with_eta_and_running_accuracy(lm, tok, tmp_path):
    printed = io.StringIO()
    config = BenchConfig(out=tmp_path, **{**SWEEP, "methods": ("none",), "tasks": ("multiturn",), "samples": 1,
                                          "setting": "aware"})
    run_bench(lm, tok, config, model_name="tiny", progress=True, on_row=lambda row: time.sleep(0.3),
              console=Console(file=printed, width=200, force_terminal=True))  # the sleep lets a refresh happen
    out = printed.getvalue()
    assert "none · multiturn · 400 · aware · acc" in out  # the cell's bar, while it runs, with its accuracy
    assert re.search(r"bench · acc \d+% of 4", out)  # overall: the running accuracy over every row
    assert "ETA" in out and "4/4" in out
