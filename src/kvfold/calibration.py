"""`kvfold calibrate`: fit what a method needs from a model's own activations on offline text, and save it.

Today: the OSCAR rotation (`rotate:oscar,calib=FILE`). The model reads `samples` seeded passages of `length` tokens
of the prose that ships with kvfold's bench (the same pool as the haystacks, in another order); a registered
attention function sees each layer's post-RoPE queries, keys and values and folds them into per-layer statistics
at once (no activations are kept but a seeded sample of rows for fitting the clip ratios). The file holds the
per-layer key and value rotations, the clip ratios, the model's identity (`config_hash`) and the kvfold version;
loading it for another model is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import KVFoldError
from .methods.rotate import clip_rows, hadamard

NAME = "kvfold_calibrate"
ATTR = "_kvfold_calibration"
CLIP_CANDIDATES = (1.0, 0.98, 0.96, 0.94, 0.92, 0.90, 0.88, 0.85, 0.82, 0.78, 0.75)
ROWS_KEPT = 4096  # rows of K and V per layer kept (seeded) to fit the clip ratios


def bit_reversal(n: int) -> torch.Tensor:
    """The bit-reversal permutation of 0..n-1 (n a power of two)."""
    bits = max(1, n.bit_length() - 1)
    return torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]) if n > 1 else torch.zeros(1).long()


def oscar_rotation(covariance: torch.Tensor) -> torch.Tensor:
    """R = U · P · H/√d for row vectors (x ↦ x @ R): U the eigenvectors of `covariance` by falling eigenvalue, P moves
    eigen-direction r to channel bitrev(r), H the normalized Hadamard that spreads every direction over all
    channels. Orthogonal; float32 [d, d]."""
    d = covariance.shape[0]
    eigenvalues, vectors = torch.linalg.eigh(covariance.double())
    vectors = vectors[:, eigenvalues.argsort(descending=True)]
    permuted = torch.empty_like(vectors)
    permuted[:, bit_reversal(d)] = vectors
    return (permuted @ hadamard(d).double() / math.sqrt(d)).float()


def per_token_error(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [n, d] minus its per-row asymmetric min-max quantization at `bits` (the error a per-token quantizer makes)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return torch.round((x - lo) / step) * step + lo - x


@dataclass
class LayerStats:
    """Running sums of one layer: queries' second moment, attention-weighted values' second moment, kept rows."""

    query_moment: torch.Tensor
    value_moment: torch.Tensor
    queries: int = 0
    weight: float = 0.0
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    value_weights: list[torch.Tensor] = field(default_factory=list)


class Collector:
    """Folds each layer's q, k, v into `LayerStats` as the forward runs."""

    def __init__(self, head_dim: int, seed: int, rows_per_sample: int) -> None:
        self.head_dim, self.rows_per_sample = head_dim, rows_per_sample
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: dict[int, LayerStats] = {}

    @property
    def seen(self) -> set[int]:
        return set(self.layers)

    def record(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        d = self.head_dim
        q = query.detach().double().reshape(-1, d).cpu()
        k, v = keys.detach().double().reshape(-1, d).cpu(), values.detach().double().reshape(-1, d).cpu()
        stats = self.layers.setdefault(layer, LayerStats(torch.zeros(d, d, dtype=torch.float64),
                                                         torch.zeros(d, d, dtype=torch.float64)))
        sample_moment = q.T @ q / q.shape[0]
        # A value matters as much as the attention its key draws: weight w = kᵀ C_Q k (this sample's C_Q), mean 1.
        w = ((k @ sample_moment) * k).sum(-1)
        w = w / w.mean().clamp_min(1e-30)
        stats.query_moment += q.T @ q
        stats.queries += q.shape[0]
        stats.value_moment += (v * w.unsqueeze(1)).T @ v
        stats.weight += float(w.sum())
        pick = torch.randperm(k.shape[0], generator=self.generator)[: self.rows_per_sample]
        stats.keys.append(k[pick].float())
        stats.values.append(v[pick].float())
        stats.value_weights.append(w[pick].float())


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    collector = getattr(module, ATTR, None)
    if collector is not None:
        collector.record(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _best_clip(rows: torch.Tensor, rotation: torch.Tensor, bits: int, metric: Callable[[torch.Tensor], torch.Tensor]):
    """The candidate ratio whose clip, then per-token quantization of the rotated rows, has the lowest `metric`."""
    rotated = rows.double() @ rotation.double()
    errors = {r: float(metric(per_token_error(clip_rows(rotated, r), bits) + clip_rows(rotated, r) - rotated))
              for r in CLIP_CANDIDATES}
    return min(errors, key=errors.get), errors


def prose_passages(tokenizer, samples: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """`samples` seeded passages ([1, ≤ length] token ids) of the bench's prose, in an order of their own (seeds
    apart from the bench's perplexity texts)."""
    from .bench.haystack import perplexity_text

    texts = [perplexity_text(tokenizer, length, seed=10_000 + seed * 1_000 + i) for i in range(samples)]
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts]


def read_passages(model, passages: list[torch.Tensor], observer, on_sample: Callable[[int], None] | None = None,
                  after_each: Callable[[], None] | None = None) -> None:
    """Run the model over `passages` (token ids [1, n] each) with `observer.record(layer, q, k, v)` seeing every
    attention layer; `after_each` runs after each passage. Errors if no passage, or if a layer was never seen."""
    from .inspection.capture import routed_attention

    if not passages:
        raise KVFoldError("calibrate: no passages to read")
    layers = model.config.get_text_config().num_hidden_layers
    device = next(model.parameters()).device
    with torch.no_grad(), routed_attention(model, NAME, _capture_attention, ATTR, observer):
        for index, ids in enumerate(passages):
            model(input_ids=ids[:1].to(device), use_cache=False)
            if index == 0 and sorted(observer.seen) != list(range(layers)):
                raise KVFoldError(f"calibrate: captured layers {sorted(observer.seen)}, expected 0..{layers - 1}; "
                                  "this model's attention modules are not all reachable")
            if after_each is not None:
                after_each()
            if on_sample is not None:
                on_sample(index + 1)


def passage_summary(passages: list[torch.Tensor]) -> dict:
    """What a calibration file records about the text it read."""
    return {"samples": len(passages), "length": max(ids.shape[-1] for ids in passages),
            "tokens": sum(ids.shape[-1] for ids in passages)}


def fit_oscar(model, passages: list[torch.Tensor], *, bits: int = 2, seed: int = 0,
              on_sample: Callable[[int], None] | None = None) -> dict:
    """Run the model over `passages` (token ids [1, n] each) and fit per-layer OSCAR rotations and clip ratios (for
    `bits`-bit per-token quantization, the scheme OSCAR pairs them with). Returns the tensors and metadata to save."""
    from .inspection.profile import model_identity

    identity = model_identity(model.config, "")
    d, layers = identity["head_dim"], identity["layers"]
    if d & (d - 1):
        raise KVFoldError(f"rotate:oscar needs head_dim a power of two (its Hadamard), this model has {d}")
    collector = Collector(d, seed, max(1, ROWS_KEPT // max(1, len(passages))))
    read_passages(model, passages, collector, on_sample)
    tensors, key_clips, value_clips = {}, [], []
    for layer in range(layers):
        stats = collector.layers[layer]
        query_moment = stats.query_moment / stats.queries
        key_rotation = oscar_rotation(query_moment)
        value_rotation = oscar_rotation(stats.value_moment / stats.weight)
        keys, values = torch.cat(stats.keys), torch.cat(stats.values)
        weights = torch.cat(stats.value_weights).double()
        # Key errors matter through the logits: E[(q·e)²] = eᵀ C_Q e; in rotated coordinates C_Q turns with R.
        rotated_moment = key_rotation.double().T @ query_moment @ key_rotation.double()
        key_clip, _ = _best_clip(keys, key_rotation, bits, lambda e: ((e @ rotated_moment) * e).sum(-1).mean())
        value_clip, _ = _best_clip(values, value_rotation, bits,
                                   lambda e: (e.pow(2).sum(-1) * weights).mean())
        tensors[f"layers.{layer}.key_rotation"] = key_rotation.contiguous()
        tensors[f"layers.{layer}.value_rotation"] = value_rotation.contiguous()
        key_clips.append(key_clip)
        value_clips.append(value_clip)
    tensors["key_clip"] = torch.tensor(key_clips, dtype=torch.float32)
    tensors["value_clip"] = torch.tensor(value_clips, dtype=torch.float32)
    return {"tensors": tensors, "identity": identity, "bits": bits, "seed": seed, **passage_summary(passages)}


class GroupGram:
    """xkv: per group of layers, the Gram matrices Xᵀ X of the prompt's keys and values laid side by side."""

    def __init__(self, layers: int, group: int) -> None:
        self.layers, self.group = layers, group
        self.sample: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen: set[int] = set()
        self.key_gram: dict[int, torch.Tensor] = {}
        self.value_gram: dict[int, torch.Tensor] = {}

    def record(self, layer: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        def side_by_side(x: torch.Tensor) -> torch.Tensor:  # [1, kv_heads, n, d] -> [n, kv_heads * d]
            return x.detach()[0].transpose(0, 1).reshape(x.shape[2], -1).double().cpu()

        self.sample[layer] = (side_by_side(keys), side_by_side(values))
        self.seen.add(layer)

    def flush(self) -> None:
        """Fold the sample just read into each group's Gram matrices."""
        for start in range(0, self.layers, self.group):
            members = range(start, min(start + self.group, self.layers))
            for index, grams in ((0, self.key_gram), (1, self.value_gram)):
                x = torch.cat([self.sample[layer][index] for layer in members], dim=1)
                grams[start // self.group] = grams.get(start // self.group, 0) + x.T @ x
        self.sample = {}


def fit_xkv(model, passages: list[torch.Tensor], method, *, seed: int = 0,
            on_sample: Callable[[int], None] | None = None) -> dict:
    """xkv with an offline basis: each group's top right singular vectors of the calibration keys (and values) laid
    side by side, at the ranks `method` (an `XKV`) gives; at run time tokens are projected on them, no SVD."""
    from .inspection.profile import model_identity

    identity = model_identity(model.config, "")
    gram = GroupGram(identity["layers"], method.layers)
    read_passages(model, passages, gram, on_sample, after_each=gram.flush)
    tensors = {}
    for group in sorted(gram.key_gram):
        key_rank, value_rank = method.ranks(gram.key_gram[group].shape[0])  # of the group's own width
        for kind, grams, rank in (("key", gram.key_gram, key_rank), ("value", gram.value_gram, value_rank)):
            eigenvalues, vectors = torch.linalg.eigh(grams[group])
            top = vectors[:, eigenvalues.argsort(descending=True)[:rank]]
            tensors[f"groups.{group}.{kind}_basis"] = top.T.float().contiguous()  # [rank, group width], orthonormal
    return {"tensors": tensors, "identity": identity, "method": method.spec(), "bits": 0, "seed": seed,
            **passage_summary(passages)}


def save_calibration(result: dict, path: str | Path, model_name: str) -> Path:
    """Write a fitted calibration as safetensors with its metadata (method, model identity, kvfold version)."""
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.is_dir():
        raise KVFoldError(f"--out '{path}' is a folder: pass a file name such as {path / 'oscar.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = dict(result["identity"], name=model_name)
    metadata = {"method": result.get("method", "rotate:oscar"), "kvfold": __version__, "model": json.dumps(identity),
                **{k: str(result[k]) for k in ("samples", "length", "bits", "seed", "tokens")}}
    save_file(result["tensors"], str(path), metadata=metadata)
    return path


def load_calibration(path: str | Path, method: str = "rotate:oscar") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a calibration file: (tensors, metadata with `model` decoded). Clear errors for missing or foreign files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise KVFoldError(f"calibration file '{path}' does not exist: write one with `kvfold calibrate --method "
                          f"{method} --out {path}`")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise KVFoldError(f"calibration file '{path}' is not a readable safetensors file ({error}): run "
                          "`kvfold calibrate` again") from None
    written = metadata.get("method", "")
    if written.split(":")[0] != method.split(":")[0] or "model" not in metadata:
        raise KVFoldError(f"calibration file '{path}' was written for '{written or 'something else'}', not "
                          f"{method}: run `kvfold calibrate --method {method}`")
    metadata["model"] = json.loads(metadata["model"])
    if method != "rotate:oscar":
        return tensors, metadata
    layers = metadata["model"]["layers"]
    missing = [f"layers.{i}.{kind}_rotation" for i in range(layers) for kind in ("key", "value")
               if f"layers.{i}.{kind}_rotation" not in tensors]
    if missing or "key_clip" not in tensors or "value_clip" not in tensors:
        raise KVFoldError(f"calibration file '{path}' is incomplete (missing {missing[:2] or 'clip ratios'}): run "
                          "`kvfold calibrate` again")
    return tensors, metadata
