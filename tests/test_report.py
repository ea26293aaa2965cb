"""`kvfold report`: intervals and the Pareto front on hand-made numbers, the report files from hand-made rows (bad
lines reported by number, empty or missing files refused), and the HTML page rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvfold import cli
from kvfold.bench.records import make_key
from kvfold.bench.report import load_report
from kvfold.bench.stats import (aggregate, mean_interval, method_family, pareto_front, sections, t_cdf_two_sided,
                                t_quantile, wilson)
from kvfold.errors import KVFoldError

Z = statistics.NormalDist().inv_cdf(0.975)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLAIN = 1000 * 2**10  # bytes of the uncompressed cache in the hand-made rows


def row(method, ratio, score, *, task="niah", setting="aware", length=1024, sample=0, question=0, share=1.0,
        prefill=0.5, tps=20.0):
    """One results line as `kvfold bench` writes it (the fields the report reads)."""
    return {"key": make_key("m", method, ratio, task, length, setting, sample, question), "model": "m",
            "method": method, "ratio": ratio, "task": task, "length": length, "setting": setting, "sample": sample,
            "question": question, "score": float(score), "kv_bytes": int(PLAIN * share), "kv_bytes_uncompressed": PLAIN,
            "prompt_tokens": length + 40, "prefill_seconds": prefill, "decode_tokens_per_second": tps,
            "device": "cpu", "device_name": "x86_64", "dtype": "float32", "torch": "t", "transformers": "tf",
            "kvfold": "k", "git_revision": None, "timestamp": "2026-01-01T00:00:00+00:00"}


def sweep() -> list[dict]:
    """none: 4/4 right; snapkv:0.5 3/4 at half the bytes; snapkv:0.75 1/4 at a quarter; kivi:4 2/4 at 60% (worse
    and bigger than snapkv:0.5: off the front); two tasks, two lengths, the vt task scored by recall."""
    rows = []
    for task in ("niah", "vt"):
        for k, length in enumerate((1024, 2048)):
            for sample in range(2):
                i = 2 * k + sample
                scores = {"none": 1, "snapkv:0.5": int(i < 3), "snapkv:0.75": int(i == 0), "kivi:4": int(i % 2 == 0)}
                if task == "vt":
                    scores = {m: s * 0.75 + 0.25 * (i == 1) for m, s in scores.items()}
                for method, ratio, share in (("none", None, 1.0), ("snapkv:0.5", 0.5, 0.5),
                                             ("snapkv:0.75", 0.75, 0.25), ("kivi:4", None, 0.6)):
                    rows.append(row(method, ratio, scores[method], task=task, length=length, sample=sample,
                                    share=share, prefill=0.001 * length, tps=40000 / length))
    return rows


def write(folder, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_wilson_matches_its_closed_forms_and_covers():
    n = 10
    assert wilson(0, n) == (0.0, pytest.approx(Z * Z / (n + Z * Z)))  # the upper end at 0/n
    assert wilson(n, n) == (pytest.approx(n / (n + Z * Z)), 1.0)
    low, high = wilson(5, n)
    assert low == pytest.approx(1 - high) and low < 0.5 < high
    rng, p, trials = random.Random(0), 0.3, 2000
    hits = sum(lo <= p <= hi for lo, hi in (wilson(sum(rng.random() < p for _ in range(40)), 40)
                                            for _ in range(trials)))
    assert 0.92 <= hits / trials <= 0.98  # ~95% coverage


def test_t_quantiles_agree_with_the_closed_forms_and_the_normal_limit():
    assert t_cdf_two_sided(1.0, 1) == pytest.approx(2 * math.atan(1.0) / math.pi)  # Cauchy
    assert t_cdf_two_sided(1.5, 2) == pytest.approx(1.5 / math.sqrt(2 + 1.5**2))
    assert t_quantile(0.95, 1) == pytest.approx(math.tan(0.975 * math.pi - math.pi / 2))
    assert t_quantile(0.95, 2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)))
    quantiles = [t_quantile(0.95, df) for df in (3, 5, 10, 30, 100, 5000)]
    assert quantiles == sorted(quantiles, reverse=True) and quantiles[-1] == pytest.approx(Z, abs=1e-3)
    for df in (3, 4, 7, 12):
        assert t_cdf_two_sided(t_quantile(0.95, df), df) == pytest.approx(0.95, abs=1e-9)


def test_mean_interval_picks_wilson_for_binary_scores_and_t_otherwise():
    binary = mean_interval([1, 0, 1, 1])
    assert binary.method == "wilson" and (binary.low, binary.high) == wilson(3, 4) and binary.mean == 0.75
    scores = [0.2, 0.4, 0.6, 0.8, 0.5]
    graded = mean_interval(scores)
    half = t_quantile(0.95, 4) * statistics.stdev(scores) / math.sqrt(5)
    assert graded.method == "t" and graded.low == pytest.approx(0.5 - half) and graded.high == pytest.approx(0.5 + half)
    assert mean_interval([0.5]).low is None and mean_interval([0.9, 1.0, 1.0]).high == 1.0  # clipped to [0, 1]
    with pytest.raises(KVFoldError):
        mean_interval([])


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [(10, 0.9), (5, 0.8), (5, 0.6), (2, 0.8), (12, 0.9), (1, 0.1), (2, 0.8)]
    assert pareto_front(points) == [True, False, False, True, False, True, True]
    assert pareto_front([(3, 0.5)]) == [True]


def test_method_family_drops_only_the_ratio():
    assert method_family("snapkv:0.5", 0.5) == "snapkv"
    assert method_family("snapkv:0.75@adakv:floor=0.3+kivi:2", 0.75) == "snapkv@adakv:floor=0.3+kivi:2"
    assert method_family("streaming:0.25,sink=8", 0.25) == "streaming:sink=8"
    assert method_family("kivi:4", None) == "kivi:4" and method_family("none", None) == "none"


def test_groups_and_sections_summarise_hand_made_rows():
    parts = sections(aggregate(sweep()))
    assert [(s.task, s.setting) for s in parts] == [("niah", "aware"), ("vt", "aware")]
    niah = {g.method: (g, on) for g, on in zip(parts[0].groups, parts[0].front)}
    assert [g.method for g in parts[0].groups] == ["none", "snapkv:0.5", "snapkv:0.75", "kivi:4"]
    assert {m: on for m, (g, on) in niah.items()} == {"none": True, "snapkv:0.5": True, "snapkv:0.75": True,
                                                      "kivi:4": False}
    snap = niah["snapkv:0.5"][0]
    assert snap.score.mean == 0.75 and snap.score.method == "wilson" and snap.compression == pytest.approx(2.0)
    assert snap.by_length == {1024: 1.0, 2048: 0.5} and snap.family == "snapkv"
    assert snap.prefill_seconds == pytest.approx(0.001 * 1536) and snap.decode_tps == pytest.approx(
        statistics.fmean([40000 / 1024, 40000 / 2048]))
    assert parts[1].groups[0].score.method == "t"  # vt: recall scores of 0.25 steps


def test_report_files_from_hand_made_rows_with_bad_lines(tmp_path):
    rows = sweep()
    write(tmp_path, rows[:5], ["{not json", json.dumps({"key": "x"})])
    with (tmp_path / "results.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows[5:]) + "\n")
    report = load_report(tmp_path)
    assert len(report.rows) == len(rows) and len(report.warnings) == 2
    assert "results.jsonl:6:" in report.warnings[0] and "results.jsonl:7:" in report.warnings[1]
    assert "missing field" in report.warnings[1] and "left out of the report" in report.warnings[0]
    paths = report.write(tmp_path)
    md = paths["md"].read_text(encoding="utf-8")
    assert "results.jsonl:6:" in md and "Wilson" in md and "Student t" in md
    assert "| snapkv:0.5 ★ | 0.5 | 4 | 75.0% | [" in md and "| kivi:4 | — | 4 | 50.0% |" in md
    low, high = wilson(3, 4)
    assert f"[{low:.0%}, {high:.0%}] wilson" in md and "2.00×" in md and "500.00 KiB" in md
    assert "score by context length" in md and "Speed by context length" in md
    page = paths["html"].read_text(encoding="utf-8")
    assert "<script src=" not in page and "Plotly.newPlot" in page and page.count("kvfold-plot-") >= 3
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_missing_empty_or_unusable_results_are_clear_errors(tmp_path):
    with pytest.raises(KVFoldError, match="no results file at .*kvfold bench --out"):
        load_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(KVFoldError, match="no result rows .*the file is empty"):
        load_report(tmp_path)
    (tmp_path / "results.jsonl").write_text("garbage\n", encoding="utf-8")
    with pytest.raises(KVFoldError, match=r"1 bad line.*results.jsonl:1:"):
        load_report(tmp_path / "results.jsonl")


def test_cli_report_writes_the_files_and_reports_bad_lines(tmp_path, monkeypatch, capsys):
    write(tmp_path, sweep(), ["{cut"])
    result = CliRunner().invoke(cli.app, ["report", str(tmp_path), "--out", str(tmp_path / "r")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "results.jsonl:33:" in result.output.replace("\n", "") and "snapkv:0.75" in result.output
    assert all((tmp_path / "r" / name).is_file() for name in ("report.md", "report.html", "report.png"))
    monkeypatch.setattr(sys, "argv", ["kvfold", "report", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit) as done:
        cli.run()
    err = capsys.readouterr().err
    assert done.value.code == 2 and "no results file" in err and len(err.strip().splitlines()) == 1


def chromium(page, tmp_path):
    """Load `page` in headless Chromium; returns (DOM after scripts ran, the page's console messages)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (CI installs Debian's chromium)")
def test_html_report_renders_its_plots_in_headless_chromium(tmp_path):
    write(tmp_path, sweep())
    paths = load_report(tmp_path).write(tmp_path)
    dom, console = chromium(paths["html"], tmp_path)
    assert console == []
    assert dom.count('class="plot-container plotly"') == 3  # accuracy vs bytes, speed vs length, heat-map
    assert dom.count('class="main-svg"') >= 6 and "Pareto front" in dom and "heatmap" in dom
    # the check itself catches a broken page
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>notDefined()</script></body></html>", encoding="utf-8")
    _, console = chromium(broken, tmp_path)
    assert any("notDefined" in line for line in console)
