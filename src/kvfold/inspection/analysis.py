"""The pass itself (`inspect_model`) and what follows from its reductions: sinks, head roles, kept maps."""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import KVFoldError
from ..models import cache_keyword
from .capture import KEYS_NOTE, ROLES, InspectConfig, Recorder, _round, recording
from .inputs import InspectInput
from .profile import model_identity
from .schema import SCHEMA_VERSION

CURVE_POINTS = 101  # importance curve samples per layer: kept fractions 0, 0.01, ..., 1


@dataclass
class Inspection:
    """The result of `inspect_model`: the profile (JSON-ready) and the maps the plots draw."""

    profile: dict
    mass: np.ndarray  # [layers, n] attention mass share per key position (mean over heads and queries)
    ratio: np.ndarray  # [layers, n] mass x n: the share relative to the mean share
    hidden_norm: np.ndarray  # [layers, n] residual-stream norm after each decoder layer
    kept: dict[str, np.ndarray] = field(default_factory=dict)  # spec -> [layers, n] share of KV heads keeping a token


@torch.inference_mode()
def inspect_model(model, tokenizer, source: InspectInput, config: InspectConfig = InspectConfig(), *,
                  model_name: str) -> Inspection:
    """Run the one pass over `source` and build the profile (see the module docstring)."""
    from .. import __version__
    from ..api import make_cache, prefill, use_kvfold_attention
    from ..cache import layer_windows
    from ..compressor import Compressor
    from ..models import context_limit

    n = len(source.ids)
    limit = context_limit(model.config)
    if n > limit:
        raise KVFoldError(f"the input has {n} tokens, past the model's context of {limit}: lower --length")
    compressors = [Compressor.parse(spec) for spec in config.methods]
    identity = model_identity(model.config, model_name)
    device = next(model.parameters()).device
    ids = torch.tensor([list(source.ids)], device=device)
    needle = [p for a, b in source.needle_spans for p in range(a, b)]
    recorder = Recorder(config, n, needle, source.question_span)
    cache = make_cache(model, compressors[0]) if compressors else None
    with recording(model, recorder):
        model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=cache is not None, logits_to_keep=1)
    missing = sorted(set(range(identity["layers"])) - set(recorder.layers))
    if missing or len(recorder.norms) != identity["layers"]:
        raise KVFoldError(f"inspect saw no attention call for layers {missing}: this model's attention does not go "
                          "through transformers' attention interface")
    caches = [cache] if cache is not None else []
    if len(compressors) > 1:
        with use_kvfold_attention(model):
            for compressor in compressors[1:]:
                caches.append(make_cache(model, compressor))
                prefill(model, caches[-1], ids)
    kept = {c.spec: _kept_map(c_cache, n) for c, c_cache in zip(compressors, caches)}
    result = _analyse(recorder, source, config, identity, kept, tokenizer, layer_windows(model.config))
    result.profile["kvfold_version"] = __version__
    return result


def _kept_map(cache, n: int) -> np.ndarray:
    """[layers, n]: the share of each layer's KV heads that keep each token (batch 0)."""
    out = np.zeros((len(cache.layers), n), dtype=np.float32)
    for index, layer in enumerate(cache.layers):
        rows = layer.kept_positions()[0]
        for row in rows:
            out[index, row.long().numpy()] += 1.0 / len(rows)
    return out


def importance_curve(mass: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """Share of the total of `mass` [n] held by its largest x·n entries, at x = 0, 1/(points-1), ..., 1 (linear
    between whole entries): a Lorenz-style curve, steep for a layer whose attention sits on a few keys."""
    ordered = np.sort(np.asarray(mass, dtype=np.float64))[::-1]
    cumulative = np.concatenate([[0.0], np.cumsum(ordered)]) / max(float(ordered.sum()), 1e-300)
    return np.interp(np.linspace(0, 1, points), np.arange(len(ordered) + 1) / len(ordered), cumulative)


def _analyse(rec: Recorder, source: InspectInput, config: InspectConfig, identity: dict,
             kept: dict[str, np.ndarray], tokenizer, windows: list[int | None]) -> Inspection:
    """Sinks, head roles and summaries from the recorded reductions (numbers rounded for the JSON)."""
    from ..compressor import Compressor

    n, layers = rec.n, identity["layers"]
    records = [rec.layers[i] for i in range(layers)]
    mass = np.stack([r.received.mean(0).numpy() for r in records])
    ratio = mass * n
    is_sink = ratio >= config.sink_factor
    norms = np.stack([rec.norms[i].numpy() for i in range(layers)])

    def token(pos: int) -> str:
        return tokenizer.decode([source.ids[pos]]) if tokenizer is not None else str(source.ids[pos])

    def sink_entry(pos: int) -> dict:
        where = np.nonzero(is_sink[:, pos])[0].tolist()
        return {"position": pos, "token": token(pos), "layers": where, "first_layer": where[0],
                "last_layer": where[-1], "peak_mass": _round(float(mass[where, pos].max())),
                "mean_mass": _round(float(mass[:, pos].mean())), "hidden_norm": _round(norms[:, pos].tolist())}

    positions = np.nonzero(is_sink.any(0))[0]
    primary = [sink_entry(int(p)) for p in positions if p < config.initial_tokens]
    secondary = sorted((sink_entry(int(p)) for p in positions if p >= config.initial_tokens),
                       key=lambda s: -s["peak_mass"])
    primary_positions = [s["position"] for s in primary]
    needle = rec.needle.numpy()
    layer_entries, counts = [], {role: 0 for role in ROLES}
    for index, r in enumerate(records):
        sinks = sorted(set(primary_positions) | set(np.nonzero(is_sink[index])[0].tolist()))
        sink_mass = r.received_late[:, sinks].sum(1) if sinks else torch.zeros(len(r.entropy))
        heads = []
        for h in range(len(r.entropy)):
            retrieval = None if r.retrieval is None else float(r.retrieval[h])
            streaming = min(1.0, float(sink_mass[h] + r.recent[h]))
            role = ("retrieval" if retrieval is not None and retrieval >= config.retrieval_threshold
                    else "streaming" if streaming >= config.streaming_threshold else "mixed")
            counts[role] += 1
            heads.append({"head": h, "kv_head": h * identity["kv_heads"] // len(r.entropy),
                          "entropy": _round(float(r.entropy[h])), "entropy_norm": _round(float(r.entropy_norm[h])),
                          "sink_mass": _round(float(sink_mass[h])), "recent_mass": _round(float(r.recent[h])),
                          "retrieval": None if retrieval is None else _round(retrieval), "role": role})
        top = np.argsort(-mass[index], kind="stable")[:config.top_positions]
        layer_entries.append({
            "index": index, "sliding_window": windows[index],
            "top_positions": [{"position": int(p), "token": token(int(p)), "mass": _round(float(mass[index, p])),
                               "ratio": _round(float(ratio[index, p]))} for p in top],
            "sink_positions": np.nonzero(is_sink[index])[0].tolist(),
            "hidden_norm_median": _round(float(np.median(norms[index]))),
            "heads": heads, "keys": r.keys, "values": r.values,
            "importance_curve": _round(importance_curve(mass[index]).tolist())})
    kept_entries = []
    for spec, image in kept.items():
        kept_entries.append({
            "method": spec, "query_aware": Compressor.parse(spec).query_aware,
            "kept_fraction": _round(image.mean(1).tolist()),
            "primary_sinks_kept": _round(image[:, primary_positions].mean(1).tolist()) if primary_positions else None,
            "needle_kept": _round(image[:, needle].mean(1).tolist()) if len(needle) else None})
    description = {"source": "ids", **source.description}
    description.update(n_tokens=n, needle_spans=[list(s) for s in source.needle_spans],
                       question_span=list(source.question_span) if source.question_span else None)
    errors = {kind: {how: _round(float(np.mean([e[kind]["quant_error"][how] for e in layer_entries])))
                     for how in ("per_channel", "per_token")} for kind in ("keys", "values")}
    profile = {
        "schema_version": SCHEMA_VERSION, "kind": "kvfold-profile", "kvfold_version": "",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": identity, "input": description,
        "settings": {**dataclasses.asdict(config), "methods": list(config.methods), "keys": KEYS_NOTE},
        "sinks": {"primary": primary, "secondary": secondary[:config.max_secondary],
                  "secondary_total": len(secondary)},
        "layers": layer_entries,
        "summary": {"roles": counts, "primary_sinks": primary_positions, "secondary_sinks": len(secondary),
                    "quant_error": errors,
                    "lower_error_axis": {kind: min(errors[kind], key=errors[kind].get).replace("_", "-")
                                         for kind in errors}},
        "kept": kept_entries,
    }
    return Inspection(profile, mass, ratio, norms, kept)
