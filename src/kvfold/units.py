"""Byte sizes for people: reading them (`--kv-budget 2GiB`) and writing them (`48.7 MiB`)."""

from __future__ import annotations

import re

from .errors import KVFoldError

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


def human_bytes(n: float, digits: int = 1) -> str:
    """1536 -> '1.5 KiB' (binary units up to GiB, `digits` decimals; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} GiB"  # pragma: no cover
