"""One exception type for every input a user can get wrong; the message names the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KVFoldError(ValueError):
    """A bad input or an unsupported setting. The CLI prints its message on one line and exits 2."""


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
