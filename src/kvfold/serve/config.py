"""`ServeConfig`: every knob of `kvfold serve`, validated before the model loads (a typo costs no 20 s load)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..compressor import Compressor
from ..errors import KVFoldError
from ..units import parse_bytes  # noqa: F401  (re-exported: `kvfold.serve.parse_bytes`)


def load_api_keys(path: Path) -> tuple[str, ...]:
    """Keys from a file, one a line; blank lines and '#' comments are skipped."""
    if not path.is_file():
        raise KVFoldError(f"API keys file '{path}' does not exist: write one key per line")
    keys = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise KVFoldError(f"API keys file '{path}' holds no key: write one key per line")
    return keys


def servable(compressor: Compressor) -> Compressor:
    """`compressor`, or a KVFoldError when the server cannot run it: it prefills prompts in blocks (to share
    prefixes), which a method that factors whole prompts (xkv) does not allow."""
    if compressor.lowrank is not None:
        raise KVFoldError(f"{compressor.lowrank.name} factors a whole prompt at once, and the server prefills in "
                          "blocks to share prefixes: serve another method")
    return compressor


@dataclass(frozen=True)
class ServeConfig:
    """What `kvfold serve` runs with. Defaults: greedy sampling unless a request sets temperature > 0.

    kv_budget bounds every KV byte the server holds: prefix-cache snapshots plus the running requests' caches
    (see `prefix_cache` for what is counted). block is the prefix cache's segment length in tokens. max_batch
    requests are decoded together, one joint forward per step; with `fast` each request's layers store and read
    through the fast loop's in-place pages and device page tables (`fastpath.Segments`), else the normal path;
    with `cuda_graphs` too (on a GPU), a step of requests that keep decoding together is replayed from a CUDA graph
    (`joint.JointGraphs`).
    """

    model_id: str = "embedded:SmolLM2-135M-Instruct"
    method: str = "none"
    kv_budget: int = 2 * 2**30
    block: int = 256
    api_keys: tuple[str, ...] = ()
    rate_limit: int | None = None  # requests per minute per key (per client address without keys)
    max_prompt_tokens: int | None = None  # None: the model's context
    max_body_bytes: int = 4 * 2**20
    queue: int = 16  # requests waiting (the running ones not counted)
    max_batch: int = 8  # requests decoded together (continuous batching)
    default_max_tokens: int = 256  # when a request gives no max_tokens
    log_prompts: bool = False
    fast: bool = True
    cuda_graphs: bool = True
    compressor: Compressor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compressor", servable(Compressor.parse(self.method)))
        object.__setattr__(self, "method", self.compressor.spec)  # canonical: one prefix-cache namespace per method
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise KVFoldError("model_id must be a non-empty name (it is what clients pass as `model`)")
        for name, minimum in (("kv_budget", 1), ("block", 1), ("max_body_bytes", 64), ("queue", 1),
                              ("max_batch", 1), ("default_max_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise KVFoldError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("rate_limit", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise KVFoldError(f"{name} must be a positive integer or None (no limit), got {value!r}")
        for name in ("fast", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise KVFoldError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.api_keys, tuple) or any(not isinstance(k, str) or len(k) < 8 for k in self.api_keys):
            raise KVFoldError("API keys must be strings of at least 8 characters (a tuple of them)")
