"""profile.json: the model identity it records, validation against `PROFILE_SCHEMA`, loading it for a given
model, per-head numbers from it, and writing a whole inspection (profile, maps, figures) to a folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import KVFoldError
from .schema import PROFILE_SCHEMA, SCHEMA_VERSION, check_schema

IDENTITY_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta",
                   "rope_parameters", "rope_scaling", "sliding_window", "layer_types", "tie_word_embeddings")


def config_hash(config) -> str:
    """sha256 (16 hex) of the text config's architecture fields: the same for any copy of the model (dtype,
    path, GGUF or safetensors), different for another architecture. It does not hash weights."""
    text = config.get_text_config()
    fields = {name: getattr(text, name, None) for name in IDENTITY_FIELDS}
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_identity(config, name: str) -> dict:
    """What a profile records about its model: name, config class, shape and `config_hash`."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    return {"name": name, "config_class": type(config).__name__, "model_type": text.model_type,
            "layers": text.num_hidden_layers, "heads": heads, "kv_heads": getattr(text, "num_key_value_heads", heads),
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads, "hidden_size": text.hidden_size,
            "config_hash": config_hash(config)}


def validate_profile(profile: dict) -> None:
    """Raise KVFoldError naming the first place where `profile` breaks `PROFILE_SCHEMA` or is inconsistent."""
    check_schema(profile, PROFILE_SCHEMA)
    model = profile["model"]
    if len(profile["layers"]) != model["layers"]:
        raise KVFoldError(f"profile: {len(profile['layers'])} layer entries for a model of {model['layers']} layers")
    for layer in profile["layers"]:
        if len(layer["heads"]) != model["heads"]:
            raise KVFoldError(f"profile: layer {layer['index']} has {len(layer['heads'])} heads, the model "
                              f"{model['heads']}")


def load_profile(path: str | Path, model_config=None) -> dict:
    """Read and validate a profile.json; with `model_config`, raise KVFoldError unless it was made for that model."""
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    if not path.is_file():
        raise KVFoldError(f"profile '{path}' does not exist: run `kvfold inspect --out DIR` to write one")
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise KVFoldError(f"profile '{path}' is not valid JSON ({error}): run `kvfold inspect` again") from None
    if isinstance(profile, dict) and profile.get("schema_version") != SCHEMA_VERSION:
        raise KVFoldError(f"profile '{path}' has schema_version {profile.get('schema_version')!r}, this kvfold reads "
                          f"{SCHEMA_VERSION}: run `kvfold inspect` again")
    validate_profile(profile)
    if model_config is not None:
        check_profile_model(profile["model"], model_config, path)
    return profile


def check_model_identity(model: dict, model_config, source: str, command: str) -> None:
    """Raise KVFoldError unless a recorded `model` identity (`model_identity`, in a profile or a calibration file)
    is that of `model_config`; `source` says what recorded it ("profile 'P' is for"), `command` what remakes it."""
    ours, theirs = model_identity(model_config, "")["config_hash"], model["config_hash"]
    if ours != theirs:
        raise KVFoldError(f"{source} model '{model['name']}' ({model['model_type']}, {model['layers']} layers x "
                          f"{model['heads']} heads, config hash {theirs}), not this one (config hash {ours}): run "
                          f"`{command}` for this model")


def check_profile_model(model: dict, model_config, path: str | Path) -> None:
    """Raise KVFoldError unless a profile's recorded `model` identity is that of `model_config`."""
    check_model_identity(model, model_config, f"profile '{path}' is for", "kvfold inspect --model M")


def head_matrix(profile: dict, key: str) -> list[list]:
    """[layer][head] values of one head field ('retrieval', 'sink_mass', 'role', ...) — what budget methods read."""
    fields = PROFILE_SCHEMA["$defs"]["head"]["properties"]
    if key not in fields:
        raise KVFoldError(f"unknown head field '{key}': one of {', '.join(fields)}")
    return [[head[key] for head in layer["heads"]] for layer in profile["layers"]]


def write_inspection(result, out: str | Path) -> list[Path]:
    """Write profile.json, maps.npz, the PNGs and index.html into `out`; return the paths written."""
    from .plots import write_figures

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KVFoldError(f"--out '{out}' is a file: pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    validate_profile(result.profile)
    (out / "profile.json").write_text(json.dumps(result.profile, indent=1, ensure_ascii=False), encoding="utf-8")
    maps = {"mass": result.mass, "ratio": result.ratio, "hidden_norm": result.hidden_norm,
            **{f"kept:{spec}": image for spec, image in result.kept.items()}}
    np.savez_compressed(out / "maps.npz", **maps)
    return [out / "profile.json", out / "maps.npz", *write_figures(result, out)]
