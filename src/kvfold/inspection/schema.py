"""The JSON schema of `profile.json` (what `kvfold inspect` writes and the `duo` / `taskkv` budgets read), and a
small checker for the subset of JSON Schema it uses (type, properties, required, additionalProperties, items,
enum, minimum, maximum, minItems, $ref into $defs), so validating needs no extra dependency.

Bump `SCHEMA_VERSION` (and the enum below) whenever a field changes meaning or a required one is added.
"""

from __future__ import annotations

from ..errors import KVFoldError

SCHEMA_VERSION = 1

_NUM = {"type": "number"}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1.0001}  # rounding may pass 1 by a hair
_INT0 = {"type": "integer", "minimum": 0}
_NUMS = {"type": "array", "items": _NUM}
_OPT_NUMS = {"type": ["array", "null"], "items": _NUM}
_SPAN = {"type": "array", "items": _INT0, "minItems": 2, "maxItems": 2}


def _object(properties: dict, required: list[str] | None = None, extra: bool = False) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": extra}


PROFILE_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "kvfold profile",
    "description": "One `kvfold inspect` pass: attention sinks, head roles, K/V channel statistics and kept-token "
                   "summaries of one model on one input. Shares are attention probabilities in [0, 1].",
    **_object({
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "kind": {"type": "string", "enum": ["kvfold-profile"]},
        "kvfold_version": {"type": "string"},
        "created": {"type": "string", "description": "UTC time, ISO 8601"},
        "model": {"$ref": "#/$defs/model"},
        "input": {"$ref": "#/$defs/input"},
        "settings": {"type": "object", "description": "InspectConfig fields plus `keys` (which keys were measured)",
                     "required": ["sink_factor", "initial_tokens", "recent_window", "retrieval_threshold",
                                  "streaming_threshold", "keys"]},
        "sinks": _object({
            "primary": {"type": "array", "items": {"$ref": "#/$defs/sink"}},
            "secondary": {"type": "array", "items": {"$ref": "#/$defs/sink"}},
            "secondary_total": _INT0,
        }),
        "layers": {"type": "array", "items": {"$ref": "#/$defs/layer"}, "minItems": 1},
        "summary": _object({
            "roles": _object({"streaming": _INT0, "retrieval": _INT0, "mixed": _INT0}),
            "primary_sinks": {"type": "array", "items": _INT0},
            "secondary_sinks": _INT0,
            "quant_error": _object({"keys": {"$ref": "#/$defs/quant_error"},
                                    "values": {"$ref": "#/$defs/quant_error"}}),
            "lower_error_axis": _object({"keys": {"type": "string", "enum": ["per-channel", "per-token"]},
                                   "values": {"type": "string", "enum": ["per-channel", "per-token"]}}),
        }),
        "kept": {"type": "array", "items": {"$ref": "#/$defs/kept"}},
    }),
    "$defs": {
        "model": _object({
            "name": {"type": "string"}, "config_class": {"type": "string"}, "model_type": {"type": "string"},
            "layers": {"type": "integer", "minimum": 1}, "heads": {"type": "integer", "minimum": 1},
            "kv_heads": {"type": "integer", "minimum": 1}, "head_dim": {"type": "integer", "minimum": 1},
            "hidden_size": {"type": "integer", "minimum": 1},
            "config_hash": {"type": "string", "description": "sha256[:16] of the architecture fields"},
        }),
        "input": {"type": "object", "required": ["source", "n_tokens", "needle_spans", "question_span"],
                  "properties": {"source": {"type": "string", "enum": ["task", "text", "ids"]},
                                 "n_tokens": {"type": "integer", "minimum": 2},
                                 "needle_spans": {"type": "array", "items": _SPAN},
                                 "question_span": {**_SPAN, "type": ["array", "null"]}}},
        "sink": _object({
            "position": _INT0, "token": {"type": "string"},
            "layers": {"type": "array", "items": _INT0, "minItems": 1},
            "first_layer": _INT0, "last_layer": _INT0, "peak_mass": _SHARE, "mean_mass": _SHARE,
            "hidden_norm": {"type": "array", "items": {"type": ["number", "null"]},
                            "description": "residual-stream norm after each layer"},
        }),
        "head": _object({
            "head": _INT0, "kv_head": _INT0,
            "entropy": {"type": "number", "minimum": 0, "description": "nats, mean over late queries"},
            "entropy_norm": {"type": "number", "minimum": 0, "description": "entropy / log(visible keys)"},
            "sink_mass": _SHARE, "recent_mass": _SHARE,
            "retrieval": {"type": ["number", "null"], "minimum": 0, "maximum": 1.0001},
            "role": {"type": "string", "enum": ["streaming", "retrieval", "mixed"]},
        }),
        "quant_error": _object({"per_channel": {"type": ["number", "null"], "minimum": 0},
                                "per_token": {"type": ["number", "null"], "minimum": 0}}),
        "channels": _object({
            "channel_absmax": {"type": "array", "items": _NUMS, "description": "[kv_head][channel]"},
            "outlier_channels": {"type": "array", "items": _SPAN, "description": "[kv_head, channel] pairs"},
            "channel_range_mean": _NUMS, "token_range_mean": _NUMS,
            "quant_error": {"$ref": "#/$defs/quant_error"},
        }),
        "layer": _object({
            "index": _INT0, "sliding_window": {"type": ["integer", "null"]},
            "top_positions": {"type": "array", "items": _object({
                "position": _INT0, "token": {"type": "string"}, "mass": _SHARE, "ratio": {"type": "number"}})},
            "sink_positions": {"type": "array", "items": _INT0},
            "hidden_norm_median": {"type": "number", "minimum": 0},
            "heads": {"type": "array", "items": {"$ref": "#/$defs/head"}, "minItems": 1},
            "keys": {"$ref": "#/$defs/channels"}, "values": {"$ref": "#/$defs/channels"},
            "importance_curve": {"type": "array", "items": _SHARE, "minItems": 2,
                                 "description": "share of the layer's attention mass held by its top x of keys, "
                                                "x = 0, 1/(len-1), ..., 1 (read by the prefixkv budget)"},
        }, required=["index", "sliding_window", "top_positions", "sink_positions", "hidden_norm_median", "heads",
                     "keys", "values"]),
        "kept": _object({
            "method": {"type": "string"}, "query_aware": {"type": "boolean"},
            "kept_fraction": {"type": "array", "items": _SHARE},
            "primary_sinks_kept": _OPT_NUMS, "needle_kept": _OPT_NUMS,
        }),
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value, kind: str) -> bool:
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return kind == "number" or isinstance(value, int)
    return isinstance(value, _TYPES[kind])


def check_schema(value, schema: dict, root: dict | None = None, where: str = "profile") -> None:
    """Raise KVFoldError at the first place `value` breaks `schema` (the subset of JSON Schema used above)."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return check_schema(value, root["$defs"][name], root, where)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            raise KVFoldError(f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__}")
    if "enum" in schema and value not in schema["enum"]:
        raise KVFoldError(f"{where}: {value!r} is not one of {schema['enum']}")
    if _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise KVFoldError(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise KVFoldError(f"{where}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise KVFoldError(f"{where}: missing required field '{key}'")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                check_schema(item, properties[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                raise KVFoldError(f"{where}: unexpected field '{key}'")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise KVFoldError(f"{where}: needs at least {schema['minItems']} items, got {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise KVFoldError(f"{where}: takes at most {schema['maxItems']} items, got {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                check_schema(item, schema["items"], root, f"{where}[{i}]")
    return None
