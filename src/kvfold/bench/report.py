"""`kvfold report DIR`: turn ``DIR/results.jsonl`` into ``report.md`` (tables), ``report.html`` (one offline page
with interactive plots and the same tables) and ``report.png`` (accuracy vs KV bytes, for a README).

Per (task, setting) and method: the mean score over answered questions with a 95% interval (see :mod:`.stats`:
Wilson for 0/1 scores, Student t otherwise), the mean KV bytes held and uncompressed, the compression (uncompressed
/ held), mean prefill seconds and decode tokens/s, and whether the method is on the accuracy-vs-bytes Pareto front.
A bad line of the results file is reported by its line number and left out; an empty or missing file is an error.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from ..errors import KVFoldError
from ..units import human_bytes
from .plots import accuracy_png, accuracy_vs_bytes, html_page, method_ratio_heatmap, speed_vs_length
from .records import read_results
from .stats import LEVEL, SETTING_NAMES, Section, aggregate, sections, speed_by_length

RESULTS_FILE = "results.jsonl"
INTERVALS = (f"Score: the mean over answered questions (each scored in [0, 1]); {LEVEL:.0%} interval: Wilson score "
             "interval when every score of the row is 0 or 1, else Student t interval of the mean clipped to [0, 1] "
             "(— for a single non-binary score). Questions sharing a context count as independent, so intervals of "
             "multi-question tasks are somewhat too narrow. KV held: mean bytes the compressed cache held when the "
             "answer ended; plain: a full cache of the model's dtype for the same prompt; compression = plain / "
             "held. ★ = on the Pareto front of (KV held, score) within the table. Task ppl: the score is teacher-forced "
             "top-1 next-token accuracy over the text's last tokens, and perplexity = exp(mean NLL per token) over "
             "the same tokens (lower is better).")


@dataclass(frozen=True)
class Grid:
    """A table as plain cells, rendered to Markdown, HTML or Rich."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> str:
        esc = lambda text: text.replace("|", "\\|")  # noqa: E731
        lines = [f"### {self.title}", "", "| " + " | ".join(map(esc, self.headers)) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.headers))) + "|"]
        lines += ["| " + " | ".join(map(esc, row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def rich(self) -> Table:
        table = Table(title=self.title)
        for i, header in enumerate(self.headers):
            table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in self.rows:
            table.add_row(*row)
        return table


@dataclass(frozen=True)
class Report:
    """The rows of one results file (or of one sweep) and the report's summaries of them."""

    source: Path
    rows: tuple[dict, ...]
    warnings: tuple[str, ...] = ()
    sections: tuple[Section, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise KVFoldError(f"no result rows in {self.source}: run `kvfold bench --out {self.source.parent}` first")
        object.__setattr__(self, "sections", tuple(sections(aggregate(self.rows))))

    @property
    def many_models(self) -> bool:
        return len({r["model"] for r in self.rows}) > 1

    def tables(self) -> list[Grid]:
        """Per section: method x ratio -> score and interval, bytes, speed; then score by length (several
        lengths only); then speed by context length."""
        out = []
        for section in self.sections:
            body = []
            ppl = any(g.perplexity is not None for g in section.groups)
            for group, on_front in zip(section.groups, section.front):
                s = group.score
                interval = f"[{s.low:.0%}, {s.high:.0%}] {s.method}" if s.low is not None else "—"
                body.append((group.method + (" ★" if on_front else ""), _ratio(group.ratio), str(s.n), f"{s.mean:.1%}",
                             interval, *((_num(group.perplexity, ".3f"),) if ppl else ()),
                             human_bytes(group.kv_bytes, 2), human_bytes(group.kv_plain, 2),
                             f"{group.compression:.2f}×" if group.compression else "—",
                             _num(group.prefill_seconds, ".3f"), _num(group.decode_tps, ".1f")))
            lengths = ", ".join(map(str, sorted({n for g in section.groups for n in g.lengths})))
            out.append(Grid(f"{section.title(self.many_models)} · lengths {lengths}",
                            ("method", "ratio", "n", "score", f"{LEVEL:.0%} interval", *(("perplexity",) if ppl else ()),
                             "KV held", "KV plain", "compression", "prefill s", "decode tok/s"), tuple(body)))
            all_lengths = sorted({n for g in section.groups for n in g.lengths})
            if len(all_lengths) > 1:
                out.append(Grid(f"{section.title(self.many_models)} · score by context length",
                                ("method", *map(str, all_lengths)),
                                tuple((g.method, *(f"{g.by_length[n]:.0%}" if n in g.by_length else "—"
                                                   for n in all_lengths)) for g in section.groups)))
        speed = speed_by_length(self.rows)
        out.append(Grid("Speed by context length (mean over tasks)",
                        ("method", "setting", *(("model",) if self.many_models else ()), "length", "n", "prefill s",
                         "decode tok/s"),
                        tuple((p.method, SETTING_NAMES.get(p.setting, p.setting), *((p.model,) if self.many_models
                                                                                   else ()),
                               str(p.length), str(p.n), _num(p.prefill_seconds, ".3f"), _num(p.decode_tps, ".1f"))
                              for p in speed)))
        return out

    def about(self) -> list[str]:
        """Where the rows came from: models, devices, versions, revisions, time span."""
        def values(*names: str) -> str:
            found = dict.fromkeys(" ".join(str(r.get(n)) for n in names) for r in self.rows)
            return ", ".join(found)
        stamps = sorted(r["timestamp"] for r in self.rows if isinstance(r.get("timestamp"), str))
        return [f"source: {self.source} · {len(self.rows)} rows", f"model: {values('model')} ({values('dtype')})",
                f"device: {values('device', 'device_name')}",
                f"versions: torch {values('torch')} · transformers {values('transformers')} · kvfold {values('kvfold')}",
                f"git revision: {values('git_revision')}",
                *([f"run: {stamps[0]} to {stamps[-1]}"] if stamps else [])]

    def markdown(self) -> str:
        lines = ["# kvfold report", "", *(f"- {line}" for line in self.about()), ""]
        if self.warnings:
            lines += [f"**{len(self.warnings)} bad line(s) left out:**", "", *(f"- {w}" for w in self.warnings), ""]
        lines += [INTERVALS, "", "![accuracy vs KV bytes](report.png)", ""]
        return "\n".join(lines) + "\n" + "\n".join(t.markdown() for t in self.tables())

    def html(self) -> str:
        intro = "<h1>kvfold report</h1><ul>" + "".join(f"<li>{html.escape(a)}</li>" for a in self.about()) + "</ul>"
        if self.warnings:
            intro += (f"<p class='warn'>{len(self.warnings)} bad line(s) left out:</p><ul class='warn'>"
                      + "".join(f"<li>{html.escape(w)}</li>" for w in self.warnings) + "</ul>")
        intro += f"<p class='note'>{html.escape(INTERVALS)}</p>"
        many, parts = self.many_models, list(self.sections)
        return html_page("kvfold report", [intro, accuracy_vs_bytes(parts, many),
                                           speed_vs_length(speed_by_length(self.rows), many),
                                           method_ratio_heatmap(parts, many), "<h2>Tables</h2>",
                                           *(t.html() for t in self.tables())])

    def write(self, folder: Path) -> dict[str, Path]:
        """Write report.md, report.html and report.png into `folder`; returns their paths by kind."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"md": folder / "report.md", "html": folder / "report.html", "png": folder / "report.png"}
        paths["md"].write_text(self.markdown(), encoding="utf-8")
        paths["html"].write_text(self.html(), encoding="utf-8")
        accuracy_png(list(self.sections), paths["png"], self.many_models)
        return paths


def results_path(target: str | Path) -> Path:
    """``DIR/results.jsonl`` for a folder, or the file itself."""
    target = Path(target)
    return target if target.suffix == ".jsonl" or target.is_file() else target / RESULTS_FILE


def load_report(target: str | Path) -> Report:
    """The report of a results folder (or file). A missing or empty file, or one with no usable row, is a
    KVFoldError; bad lines become the report's warnings (with their line numbers)."""
    path = results_path(target)
    if not path.is_file():
        raise KVFoldError(f"no results file at {path}: run `kvfold bench --out {path.parent}` first, or pass the "
                          "folder that holds results.jsonl")
    done, warnings = read_results(path, consequence="left out of the report")
    if not done:
        bad = f" ({len(warnings)} bad line(s); the first: {warnings[0]})" if warnings else " (the file is empty)"
        raise KVFoldError(f"no result rows in {path}{bad}: run `kvfold bench --out {path.parent}` to fill it")
    return Report(path, tuple(done.values()), tuple(warnings))


def _ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:g}"


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def summary_grid(report: Report, title: str = "kvfold") -> Grid:
    """One compact table for the terminal: method (rows) x section (score and 95% interval), then the mean KV held,
    its share of the uncompressed cache, prefill seconds and decode tokens/s over all sections."""
    sections_: Sequence[Section] = report.sections
    methods = list(dict.fromkeys(g.method for s in sections_ for g in s.groups))
    rows = []
    for method in methods:
        cells, groups = [], []
        for section in sections_:
            group = next((g for g in section.groups if g.method == method), None)
            if group is None:
                cells.append("—")
                continue
            s = group.score
            cells.append(f"{s.mean:.0%}" + (f" [{s.low * 100:.0f}–{s.high * 100:.0f}]" if s.low is not None else ""))
            groups.append(group)
        held, plain = sum(g.kv_bytes for g in groups), sum(g.kv_plain for g in groups)
        prefill = [g.prefill_seconds for g in groups if g.prefill_seconds is not None]
        decode = [g.decode_tps for g in groups if g.decode_tps is not None]
        rows.append((method, *cells, human_bytes(held / len(groups), 2) if groups else "—",
                     f"{held / plain:.0%}" if plain else "—", _num(sum(prefill) / len(prefill) if prefill else None,
                                                                   ".2f"),
                     _num(sum(decode) / len(decode) if decode else None, ".1f")))
    settings = len({s.setting for s in sections_}) > 1
    names = [s.task + (f" {s.setting}" if settings else "") + (f" {s.model}" if report.many_models else "")
             for s in sections_]
    headers = ("method", *names, "KV held", "of plain", "prefill s", "tok/s")
    return Grid(f"{title} · accuracy % [95% interval]", headers, tuple(rows))
