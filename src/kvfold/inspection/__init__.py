"""`kvfold inspect`: one forward pass that shows why compression methods work on *this* model and input.

What one pass measures, per layer (reduced as it runs, never holding [heads, n, n] attention for all layers):
- attention sinks: the mass share each key position receives (mean over query heads and queries, so a layer's
  shares sum to 1); a position is a sink in a layer when its share is >= `sink_factor` / n, i.e. `sink_factor`
  times the mean share. The default 20 sits well above what causality alone gives the first position (a query
  attending uniformly over its past gives position 0 about (ln n + 0.58) / n: 8.2x the mean at 2k tokens, 11x at
  32k). Sinks before `initial_tokens` are primary, later ones secondary (with the layers where they start and
  stop). The residual-stream norm of every sink token per layer (massive activations);
- head roles: per (layer, query head) attention entropy, mass on the layer's sinks, mass on the newest
  `recent_window` keys (both over the queries at positions >= recent_window) and, when the input has a needle, a
  retrieval score (the mean attention of the question's tokens on the needle's tokens). Retrieval heads score
  >= `retrieval_threshold`; streaming heads put >= `streaming_threshold` on sinks + window; the rest are mixed;
- per-channel key/value statistics of post-RoPE keys (what the cache stores) and values: channel abs-max, outlier
  channels, per-channel vs per-token ranges, and the relative error of simulated min-max quantization per channel
  (groups of `quant_group` tokens) and per token (groups of min(quant_group, head_dim) channels);
- what a method keeps: the pass runs through a `KVFoldCache` of the first `--method` spec (query-aware: the
  question is in the prompt) and reads back the positions every layer keeps; further specs take one prefill each.

The numbers go to `profile.json` (schema `PROFILE_SCHEMA`, read back with `load_profile`), the maps to
`maps.npz`, and the figures (`plots`) to PNGs and `index.html`.
"""

from .analysis import Inspection, inspect_model
from .capture import KEYS_NOTE, InspectConfig, Recorder, recording
from .inputs import InspectInput, parse_length, task_input, text_input
from .profile import (PROFILE_SCHEMA, SCHEMA_VERSION, config_hash, head_matrix, load_profile, model_identity,
                      validate_profile, write_inspection)

__all__ = [
    "KEYS_NOTE", "PROFILE_SCHEMA", "SCHEMA_VERSION", "InspectConfig", "InspectInput", "Inspection",
    "Recorder", "config_hash", "head_matrix", "inspect_model", "load_profile", "model_identity", "parse_length",
    "recording", "task_input", "text_input", "validate_profile", "write_inspection",
]
