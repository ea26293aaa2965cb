"""Figures of a `kvfold inspect` pass (PNG, matplotlib without pyplot's global state) and the `index.html` that
shows them with short captions. Position axes longer than `MAX_COLUMNS` are binned: sink and kept maps keep each
bin's maximum / mean so that a one-token sink stays visible."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

MAX_COLUMNS = 1024
ZOOM = 64  # first positions shown unbinned in the sink figure


def _bin(image: np.ndarray, how) -> tuple[np.ndarray, float]:
    """[rows, n] -> [rows, <= MAX_COLUMNS] reduced by `how` per bin, and the bin width in positions."""
    n = image.shape[1]
    if n <= MAX_COLUMNS:
        return image, 1.0
    width = -(-n // MAX_COLUMNS)
    bins = -(-n // width)
    padded = np.full((image.shape[0], width * bins), np.nan)
    padded[:, :n] = image  # only the last bin has padding, and it holds at least one real column
    return how(padded.reshape(image.shape[0], bins, width), axis=2), float(width)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def sinks_figure(result, path: Path) -> Path:
    profile, n = result.profile, result.mass.shape[1]
    fig = Figure(figsize=(13, 9), layout="constrained")
    top, zoom, norms = fig.subplots(3, 1, height_ratios=[3, 2, 2])
    binned, width = _bin(np.maximum(result.ratio, 1e-3), np.nanmax)
    image = top.imshow(binned, aspect="auto", origin="lower", interpolation="nearest", cmap="magma",
                       norm=LogNorm(vmin=0.1, vmax=max(10.0, float(np.nanmax(binned)))),
                       extent=(0, binned.shape[1] * width, -0.5, binned.shape[0] - 0.5))
    fig.colorbar(image, ax=top, label="mass share x n (1 = mean)")
    for sink in profile["sinks"]["secondary"]:
        top.plot([sink["position"]] * 2, [sink["first_layer"] - 0.5, sink["last_layer"] + 0.5], color="cyan", lw=0.6)
    top.set(title=f"attention mass received per key position (sink: >= {profile['settings']['sink_factor']:g}x "
                  "the mean; cyan: secondary sinks' layer span)", xlabel="key position", ylabel="layer")
    first = min(n, ZOOM)
    image = zoom.imshow(result.mass[:, :first], aspect="auto", origin="lower", interpolation="nearest",
                        cmap="viridis", norm=LogNorm(vmin=1e-4, vmax=1.0))
    fig.colorbar(image, ax=zoom, label="mass share")
    zoom.set(title=f"first {first} positions, mass share", xlabel="key position", ylabel="layer")
    median = np.median(result.hidden_norm, axis=1)
    layers = np.arange(result.hidden_norm.shape[0])
    for sink in profile["sinks"]["primary"][:4] + profile["sinks"]["secondary"][:4]:
        pos = sink["position"]
        norms.plot(layers, result.hidden_norm[:, pos] / median, marker=".",
                   label=f"pos {pos} {sink['token']!r}" + (" (primary)" if sink in profile["sinks"]["primary"] else ""))
    norms.axhline(1.0, color="grey", lw=0.8, ls="--")
    norms.set(yscale="log", xlabel="layer", ylabel="norm / median token norm",
              title="residual-stream norm of sink tokens (massive activations)")
    if norms.get_legend_handles_labels()[0]:
        norms.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def heads_figure(result, path: Path) -> Path:
    layers = result.profile["layers"]
    heads = [h for layer in layers for h in layer["heads"]]
    has_retrieval = heads[0]["retrieval"] is not None
    fig = Figure(figsize=(14, 4.8), layout="constrained")
    scatter_ax, stream_ax, third_ax = fig.subplots(1, 3, width_ratios=[4, 3, 3])
    color = np.array([h["retrieval"] if has_retrieval else h["sink_mass"] for h in heads])
    markers = {"streaming": "o", "retrieval": "*", "mixed": "s"}
    points = None
    for role, marker in markers.items():
        index = [i for i, h in enumerate(heads) if h["role"] == role]
        if index:
            points = scatter_ax.scatter([heads[i]["recent_mass"] for i in index],
                                        [heads[i]["entropy_norm"] for i in index], c=color[index], cmap="viridis",
                                        vmin=0, vmax=max(1e-6, float(color.max())), marker=marker, s=28,
                                        edgecolors="k", linewidths=0.3, label=f"{role} ({len(index)})")
    if points is not None:
        fig.colorbar(points, ax=scatter_ax, label="retrieval score" if has_retrieval else "sink mass")
    scatter_ax.legend(fontsize=8)
    scatter_ax.set(xlabel="mass on the recent window", ylabel="entropy / log(visible keys)",
                   title="head roles (one point per layer x head)")
    streaming = np.array([[min(1.0, h["sink_mass"] + h["recent_mass"]) for h in layer["heads"]] for layer in layers])
    image = stream_ax.imshow(streaming, aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=stream_ax)
    stream_ax.set(title="sink + recent-window mass", xlabel="head", ylabel="layer")
    key = "retrieval" if has_retrieval else "entropy_norm"
    third = np.array([[h[key] for h in layer["heads"]] for layer in layers], dtype=float)
    image = third_ax.imshow(third, aspect="auto", origin="lower", cmap="Oranges", vmin=0)
    fig.colorbar(image, ax=third_ax)
    third_ax.set(title="retrieval score (needle mass)" if has_retrieval else "normalised entropy",
                 xlabel="head", ylabel="layer")
    return _save(fig, path)


def channels_figure(result, path: Path) -> Path:
    layers = result.profile["layers"]
    fig = Figure(figsize=(13, 8), layout="constrained")
    (k_ax, v_ax), (err_ax, range_ax) = fig.subplots(2, 2)
    for ax, kind in ((k_ax, "keys"), (v_ax, "values")):
        grid = np.array([np.ravel(layer[kind]["channel_absmax"]) for layer in layers])
        image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="inferno",
                          norm=LogNorm(vmin=max(1e-3, float(grid[grid > 0].min(initial=1e-3))), vmax=grid.max()))
        fig.colorbar(image, ax=ax, label="abs-max over tokens")
        outliers = sum(len(layer[kind]["outlier_channels"]) for layer in layers)
        ax.set(title=f"{kind}: per-channel abs-max ({outliers} outlier channels)",
               xlabel="kv_head x head_dim + channel", ylabel="layer")
    x = np.arange(len(layers))
    bits = result.profile["settings"]["quant_bits"]
    for kind, style in (("keys", "-"), ("values", "--")):
        for how, color in (("per_channel", "tab:blue"), ("per_token", "tab:red")):
            err_ax.plot(x, [layer[kind]["quant_error"][how] or np.nan for layer in layers], style, color=color,
                        label=f"{kind} {how.replace('_', '-')}")
        range_ax.plot(x, [np.mean(layer[kind]["channel_range_mean"]) for layer in layers], style, color="tab:blue",
                      label=f"{kind}: range over tokens (per channel)")
        range_ax.plot(x, [np.mean(layer[kind]["token_range_mean"]) for layer in layers], style, color="tab:red",
                      label=f"{kind}: range over channels (per token)")
    err_ax.set(yscale="log", xlabel="layer", ylabel="relative squared error",
               title=f"simulated {bits}-bit min-max quantization error (lower is better)")
    err_ax.legend(fontsize=8)
    range_ax.set(yscale="log", xlabel="layer", ylabel="mean range", title="per-channel vs per-token ranges")
    range_ax.legend(fontsize=8)
    return _save(fig, path)


def kept_figure(result, spec: str, path: Path) -> Path:
    image, width = _bin(result.kept[spec], np.nanmean)
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(image, aspect="auto", origin="lower", interpolation="nearest", cmap="Greens", vmin=0, vmax=1,
                      extent=(0, image.shape[1] * width, -0.5, image.shape[0] - 0.5))
    fig.colorbar(shown, ax=ax, label="share of KV heads keeping the token")
    source = result.profile["input"]
    for start, end in source["needle_spans"]:
        ax.axvspan(start, end, color="red", alpha=0.25, lw=0)
    if source["question_span"]:
        ax.axvline(source["question_span"][0], color="blue", lw=0.8, ls="--")
    kept = float(np.mean(result.kept[spec]))
    ax.set(title=f"{spec}: tokens kept per layer ({kept:.0%} overall; red: needle, dashed: question starts)",
           xlabel="token position", ylabel="layer")
    return _save(fig, path)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_") or "method"


def write_figures(result, out: Path) -> list[Path]:
    """Every PNG and index.html in `out`; returns their paths."""
    figures = [
        (sinks_figure(result, out / "sinks.png"),
         "Attention sinks: the mass each key position receives per layer relative to the mean share (bins "
         "keep their maximum), the first positions unbinned, and the residual-stream norm of sink tokens."),
        (heads_figure(result, out / "heads.png"),
         "Head roles: entropy vs mass on the recent window per (layer, head), colored by retrieval score; streaming "
         "heads sit high on sink + window mass, retrieval heads attend to the needle when the question asks for it."),
        (channels_figure(result, out / "channels.png"),
         "Key (post-RoPE) and value statistics per channel: outlier channels, and the simulated quantization error "
         "per channel vs per token, which predicts which axis a quantizer should group along."),
    ]
    for index, spec in enumerate(result.kept):
        figures.append((kept_figure(result, spec, out / f"kept_{index}_{_slug(spec)}.png"),
                        f"What {spec} keeps on this input: share of KV heads that keep each token, per layer."))
    (out / "index.html").write_text(_page(result.profile, figures), encoding="utf-8")
    return [path for path, _ in figures] + [out / "index.html"]


def summary_rows(profile: dict) -> list[tuple[str, str]]:
    """(label, text) lines that sum a profile up: the CLI prints them, index.html shows them as a table."""
    model, source, summary = profile["model"], profile["input"], profile["summary"]
    what = source.get("task") or source.get("file") or source["source"]

    def sinks(entries: list[dict]) -> str:
        return ", ".join(f"{s['position']} {s['token']!r} (layers {s['first_layer']}-{s['last_layer']}, peak mass "
                         f"{s['peak_mass']:.2f})" for s in entries) or "none"

    rows = [("model", f"{model['name']} ({model['model_type']}, {model['layers']} layers, {model['heads']} heads, "
                      f"{model['kv_heads']} KV heads, head_dim {model['head_dim']}, config {model['config_hash']})"),
            ("input", f"{what}, {source['n_tokens']} tokens"),
            ("primary sinks", sinks(profile["sinks"]["primary"])),
            ("secondary sinks", f"{summary['secondary_sinks']} found" + (
                f"; strongest: {sinks(profile['sinks']['secondary'][:5])}" if summary["secondary_sinks"] else "")),
            ("head roles", ", ".join(f"{count} {role}" for role, count in summary["roles"].items())),
            ("quantization", "lower simulated error: keys {keys}, values {values}".format(
                **summary["lower_error_axis"]))]
    for kept in profile["kept"]:
        needle = kept["needle_kept"]
        rows.append((f"kept by {kept['method']}", f"{sum(kept['kept_fraction']) / len(kept['kept_fraction']):.0%} of "
                     "tokens" + (f", {sum(needle) / len(needle):.0%} of needle tokens" if needle else "")))
    return rows


def _page(profile: dict, figures: list[tuple[Path, str]]) -> str:
    model = profile["model"]
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(profile))
    body = "\n".join(f'<figure><img src="{path.name}" alt="{path.stem}"><figcaption>{html.escape(caption)}'
                     "</figcaption></figure>" for path, caption in figures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kvfold inspect · {html.escape(model['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}}img{{max-width:100%}}
th{{text-align:left;padding-right:1em;vertical-align:top}}figure{{margin:2em 0}}figcaption{{color:#444}}</style>
</head><body><h1>kvfold inspect</h1>
<table>{table}</table>
<p>Numbers: <a href="profile.json">profile.json</a> (schema version {profile['schema_version']}); maps: maps.npz.</p>
{body}
</body></html>
"""
