"""`ServeConfig`: every knob of `kvfold serve`, validated before the model loads (a typo costs no 20 s load)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..compressor import Compressor
from ..errors import KVFoldError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """'2GiB' -> 2147483648; '500MB', '1e9', '65536' and plain ints too (K/M/G are binary, KB/MB/GB decimal)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise KVFoldError(f"cannot read '{text}' as a size: use e.g. 2GiB, 512MiB, 500MB or a number of bytes")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise KVFoldError(f"size '{text}' must be positive")
    return value


def load_api_keys(path: Path) -> tuple[str, ...]:
    """Keys from a file, one a line; blank lines and '#' comments are skipped."""
    if not path.is_file():
        raise KVFoldError(f"API keys file '{path}' does not exist: write one key per line")
    keys = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise KVFoldError(f"API keys file '{path}' holds no key: write one key per line")
    return keys


@dataclass(frozen=True)
class ServeConfig:
    """What `kvfold serve` runs with. Defaults: greedy sampling unless a request sets temperature > 0.

    kv_budget bounds every KV byte the server holds: prefix-cache snapshots plus the running request's cache
    (see `prefix_cache` for what is counted). block is the prefix cache's segment length in tokens.
    """

    model_id: str = "embedded:SmolLM2-135M-Instruct"
    method: str = "none"
    kv_budget: int = 2 * 2**30
    block: int = 256
    api_keys: tuple[str, ...] = ()
    rate_limit: int | None = None  # requests per minute per key (per client address without keys)
    max_prompt_tokens: int | None = None  # None: the model's context
    max_body_bytes: int = 4 * 2**20
    queue: int = 16  # requests waiting (the running one not counted)
    default_max_tokens: int = 256  # when a request gives no max_tokens
    log_prompts: bool = False
    compressor: Compressor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compressor", Compressor.parse(self.method))
        object.__setattr__(self, "method", self.compressor.spec)  # canonical: one prefix-cache namespace per method
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise KVFoldError("model_id must be a non-empty name (it is what clients pass as `model`)")
        for name, minimum in (("kv_budget", 1), ("block", 1), ("max_body_bytes", 64), ("queue", 1),
                              ("default_max_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise KVFoldError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("rate_limit", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise KVFoldError(f"{name} must be a positive integer or None (no limit), got {value!r}")
        if not isinstance(self.api_keys, tuple) or any(not isinstance(k, str) or len(k) < 8 for k in self.api_keys):
            raise KVFoldError("API keys must be strings of at least 8 characters (a tuple of them)")
