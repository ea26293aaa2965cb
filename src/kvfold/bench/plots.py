"""The report's figures: interactive plotly figures for ``report.html`` (plotly.js is inlined by :func:`html_page`,
so the page works offline) and a matplotlib PNG of accuracy vs KV bytes for the README.

Colours follow the method family (the spec without its ratio) and are the same in every figure and the PNG.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from .stats import SETTING_NAMES, Section, SpeedPoint

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MIB = 2**20
COLUMNS = 3  # subplots per row


def colours(sections: Sequence[Section]) -> dict[str, str]:
    families = list(dict.fromkeys(g.family for s in sections for g in s.groups))
    return {family: PALETTE[i % len(PALETTE)] for i, family in enumerate(families)}


def _grid(n: int) -> tuple[int, int]:
    cols = min(COLUMNS, max(1, n))
    return math.ceil(n / cols), cols


def _label(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:g}"


def accuracy_vs_bytes(sections: Sequence[Section], with_model: bool = False):
    """One panel per section: mean score (95% interval as error bars) against mean KV bytes held, one colour per
    method family, the Pareto front drawn as a dashed staircase (the best score reachable within a byte budget) through circled
    points."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = _grid(len(sections))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[s.title(with_model) for s in sections],
                        horizontal_spacing=0.08, vertical_spacing=0.18 if rows > 1 else 0.1)
    palette, shown = colours(sections), set()
    for k, section in enumerate(sections):
        row, col = k // cols + 1, k % cols + 1
        for family in dict.fromkeys(g.family for g in section.groups):
            members = [g for g in section.groups if g.family == family]
            fig.add_trace(go.Scatter(
                x=[g.kv_bytes / MIB for g in members], y=[g.score.mean for g in members], mode="markers+lines",
                name=family, legendgroup=family, showlegend=family not in shown,
                marker=dict(color=palette[family], size=9), line=dict(color=palette[family], width=1),
                error_y=dict(type="data", symmetric=False,
                             array=[(g.score.high - g.score.mean) if g.score.high is not None else 0 for g in members],
                             arrayminus=[(g.score.mean - g.score.low) if g.score.low is not None else 0
                                         for g in members]),
                text=[f"{g.method}<br>ratio {_label(g.ratio)} · n={g.score.n}<br>score {g.score.mean:.1%}"
                      f"<br>KV held {g.kv_bytes / MIB:.2f} MiB ({g.kv_bytes / g.kv_plain:.0%} of plain)"
                      for g in members],
                hovertemplate="%{text}<extra></extra>"), row=row, col=col)
            shown.add(family)
        front = sorted((g.kv_bytes / MIB, g.score.mean) for g, on in zip(section.groups, section.front) if on)
        fig.add_trace(go.Scatter(
            x=[x for x, _ in front], y=[y for _, y in front], mode="lines+markers", name="Pareto front",
            legendgroup="pareto", showlegend="pareto" not in shown, hoverinfo="skip",
            line=dict(color="black", dash="dash", width=1.5, shape="hv"),
            marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="black", width=2))), row=row, col=col)
        shown.add("pareto")
        fig.update_xaxes(title_text="KV held (MiB)", row=row, col=col)
        fig.update_yaxes(title_text="mean score", range=[-0.05, 1.05], tickformat=".0%", row=row, col=col)
    fig.update_layout(title="Accuracy vs KV bytes held (95% intervals; Pareto front dashed)",
                      height=380 * rows + 80, template="plotly_white", legend=dict(orientation="h", y=-0.15))
    return fig


def speed_vs_length(points: Sequence[SpeedPoint], with_model: bool = False):
    """Prefill seconds and decode tokens/s against the context length, one line per (setting, method)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("prefill (s)", "decode (tokens/s)"), horizontal_spacing=0.1)
    lines = list(dict.fromkeys((p.model, p.setting, p.method) for p in points))
    for i, (model, setting, method) in enumerate(lines):
        mine = [p for p in points if (p.model, p.setting, p.method) == (model, setting, method)]
        name = f"{method} · {SETTING_NAMES.get(setting, setting)}" + (f" · {model}" if with_model else "")
        colour = PALETTE[i % len(PALETTE)]
        for col, values in ((1, [p.prefill_seconds for p in mine]), (2, [p.decode_tps for p in mine])):
            fig.add_trace(go.Scatter(x=[p.length for p in mine], y=values, mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1, line=dict(color=colour),
                                     text=[f"{name}<br>length {p.length} (prompt ~{p.context_tokens:.0f} tokens)"
                                           f"<br>n={p.n}" for p in mine],
                                     hovertemplate="%{text}<br>%{y:.3g}<extra></extra>"), row=1, col=col)
    lengths = sorted({p.length for p in points})
    pad = 0.1 * (lengths[-1] - lengths[0] or lengths[0])
    for col in (1, 2):
        fig.update_xaxes(title_text="context length (tokens)", tickmode="array", tickvals=lengths,
                         range=[lengths[0] - pad, lengths[-1] + pad], row=1, col=col)
    fig.update_layout(title="Speed vs context length (means over tasks and questions)", height=460,
                      template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig


def method_ratio_heatmap(sections: Sequence[Section], with_model: bool = False):
    """One heat-map per section: mean score by method family (rows) and ratio (columns; "—" = no ratio)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = _grid(len(sections))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[s.title(with_model) for s in sections],
                        horizontal_spacing=0.12, vertical_spacing=0.2 if rows > 1 else 0.1)
    for k, section in enumerate(sections):
        families = list(dict.fromkeys(g.family for g in section.groups))
        ratios = sorted({g.ratio for g in section.groups}, key=lambda r: -1.0 if r is None else r)
        cell = {(g.family, g.ratio): g for g in section.groups}
        z = [[cell[f, r].score.mean if (f, r) in cell else None for r in ratios] for f in families]
        text = [[f"{cell[f, r].score.mean:.0%}" if (f, r) in cell else "" for r in ratios] for f in families]
        fig.add_trace(go.Heatmap(z=z, x=[_label(r) for r in ratios], y=families, text=text, texttemplate="%{text}",
                                 zmin=0, zmax=1, colorscale="Viridis", showscale=k == 0,
                                 colorbar=dict(title="score", tickformat=".0%"),
                                 hovertemplate="%{y} · ratio %{x}<br>score %{z:.1%}<extra></extra>"),
                      row=k // cols + 1, col=k % cols + 1)
        fig.update_xaxes(title_text="ratio (fraction removed)", type="category", row=k // cols + 1, col=k % cols + 1)
        fig.update_yaxes(type="category", autorange="reversed", row=k // cols + 1, col=k % cols + 1)
    fig.update_layout(title="Mean score by method and ratio", height=max(300, 60 * rows * max(
        len({g.family for g in s.groups}) for s in sections)) + 120, template="plotly_white")
    return fig


def accuracy_png(sections: Sequence[Section], path: Path, with_model: bool = False) -> Path:
    """A static PNG of accuracy vs KV bytes held (one panel per section), for the README."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    rows, cols = _grid(len(sections))
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows + 0.8), dpi=120, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    palette, handles = colours(sections), {}
    for k, section in enumerate(sections):
        ax = axes[k // cols][k % cols]
        for family in dict.fromkeys(g.family for g in section.groups):
            members = [g for g in section.groups if g.family == family]
            low = [g.score.mean - g.score.low if g.score.low is not None else 0 for g in members]
            high = [g.score.high - g.score.mean if g.score.high is not None else 0 for g in members]
            handles[family] = ax.errorbar([g.kv_bytes / MIB for g in members], [g.score.mean for g in members],
                                          yerr=[low, high], fmt="o-", color=palette[family], capsize=3, lw=1, ms=5)
        front = sorted((g.kv_bytes / MIB, g.score.mean) for g, on in zip(section.groups, section.front) if on)
        (handles["Pareto front"],) = ax.plot([x for x, _ in front], [y for _, y in front], "k--", lw=1.2, marker="o",
                                             mfc="none", ms=11, drawstyle="steps-post")
        ax.set_title(section.title(with_model), fontsize=10)
        ax.set_xlabel("KV held (MiB)")
        ax.set_ylabel("mean score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for k in range(len(sections), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle("kvfold: accuracy vs KV bytes held (95% intervals; Pareto front dashed)", fontsize=11)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(5, len(handles)),
               fontsize=8, frameon=False)
    fig.savefig(path)
    return path


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1280px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.88rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }} .note {{ color: #555; font-size: 0.9rem; }} .warn {{ color: #a40; }}
</style>
<script>{plotly_js}</script>
</head><body>
{body}
</body></html>
"""


def html_page(title: str, parts: Sequence[object]) -> str:
    """One self-contained page: plotly.js inlined once in the head, then each part in order (a plotly figure, or
    a string of HTML)."""
    import plotly.offline

    body = []
    for k, part in enumerate(parts):
        if isinstance(part, str):
            body.append(part)
        else:
            body.append(part.to_html(full_html=False, include_plotlyjs=False, div_id=f"kvfold-plot-{k}",
                                     config={"displaylogo": False, "responsive": True}))
    return PAGE.format(title=html.escape(title), plotly_js=plotly.offline.get_plotlyjs(), body="\n".join(body))
