"""Offline, seeded, deterministic long-context task samples (needle-in-a-haystack) and their metric.

The haystack is English prose taken from CPython's own reference docs (``pydoc_data.topics``), so
nothing is downloaded and no text is pasted into the repo. Code, grammar rules, tables and headings
are dropped; see :func:`prose_paragraphs`.
"""

from __future__ import annotations

import functools
import math
import random
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import KVFoldError

TASKS: dict[str, str] = {
    "niah": "needle in a haystack: recall a 7-digit 'special magic number' hidden at a given depth of prose",
}

NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
MIN_SLACK = 64  # a context must have room for at least this many haystack tokens besides the needle

_WORDS = (
    "amber", "anchor", "apple", "arrow", "autumn", "bamboo", "basket", "beacon", "birch", "blossom",
    "breeze", "bridge", "bronze", "cabin", "candle", "canyon", "castle", "cedar", "cherry", "cloud",
    "clover", "comet", "copper", "coral", "cotton", "crystal", "dawn", "desert", "dolphin", "dragon",
    "eagle", "ember", "falcon", "feather", "fern", "forest", "fossil", "garden", "glacier", "granite",
    "harbor", "hazel", "honey", "island", "ivory", "jasmine", "jungle", "kettle", "lagoon", "lantern",
    "lemon", "lilac", "maple", "marble", "meadow", "meteor", "mirror", "canvas", "nectar", "oasis",
    "ocean", "olive", "orchid", "otter", "paper", "pebble", "pepper", "pillow", "pine", "planet",
    "plum", "prairie", "quartz", "rabbit", "raven", "ribbon", "river", "saddle", "salmon", "silver",
    "spruce", "stone", "summit", "sunset", "thunder", "tiger", "timber", "tulip", "valley", "velvet",
    "violet", "walnut", "willow", "winter", "wolf", "yarrow", "zephyr", "lotus", "marsh", "spiral",
)

_MIN_SENTENCES = 2
_MAX_SENTENCE_CHARS = 240  # keeps trimming at a sentence boundary within ~60 tokens of the target
_SEED_STRIDE = 1_000_003
# End of a sentence: terminal punctuation (plus closing quote/paren) followed by a capitalised start or the end.
_SENT_END = re.compile(r"[.!?][\"”’)]?(?=\s+[\"“(A-Z]|\s*$)")
_SYMBOLS = set("=<>{}[]|\\/#@$%^~`+&_")


@dataclass(frozen=True)
class Sample:
    """One task instance: feed ``context`` then ``question``; score the model's reply against ``answer``."""

    task: str
    context: str
    question: str
    answer: str
    meta: dict


def _is_codeish(line: str) -> bool:
    """A line of code, grammar, a table or a heading underline rather than prose."""
    s = line.strip()
    if s.startswith((">>>", "...", "$ ", "%")) or "::=" in s or s.endswith("::"):
        return True
    return sum(c in _SYMBOLS for c in s) > 0.08 * max(len(s), 1)


def _tidy(text: str) -> str:
    """Drop footnote marks and reST emphasis, collapse whitespace."""
    text = re.sub(r"\s?\[\d+\]", "", text)
    text = re.sub(r"\*{1,2}([^*\s][^*]*?)\*{1,2}", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(text: str) -> bool:
    """Starts like a sentence, ends like one, has several of them, none overly long."""
    ends = [m.end() for m in _SENT_END.finditer(text)]
    if not text or not (text[0].isupper() or text[0] in "\"“(") or not ends or ends[-1] != len(text):
        return False
    lengths = [b - a for a, b in zip([0] + ends[:-1], ends)]
    return len(ends) >= _MIN_SENTENCES and max(lengths) <= _MAX_SENTENCE_CHARS


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the Python reference docs bundled with CPython, in a fixed order.

    A blank-line separated block is kept only when, after dedenting (and turning a leading "* "
    bullet into indentation), all its lines share one indentation (ragged blocks are code or grammar),
    no line is code-ish (``>>>``, ``::=``, ``::`` endings, symbol-heavy lines such as tables and
    heading underlines), and the joined text starts with a capital, ends with a full stop and has at
    least two sentences of at most 240 characters each. Footnote marks and ``*emphasis*`` are removed.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for name in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[name]):
            lines = [line.rstrip() for line in block.splitlines() if line.strip()]
            if not lines:
                continue
            lines[0] = re.sub(r"^(\s*)[*-] ", r"\1  ", lines[0])
            lines = textwrap.dedent("\n".join(lines)).splitlines()
            if any(line[:1].isspace() for line in lines) or any(_is_codeish(line) for line in lines):
                continue
            text = _tidy(" ".join(lines))
            if _is_prose(text) and text not in seen:
                seen.add(text)
                out.append(text)
    return tuple(out)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_haystack(tokenizer: Any, n_tokens: int, seed: int) -> str:
    """Seeded prose of at most ``n_tokens`` tokens (and at least ~``n_tokens - 60``), cut at a sentence end.

    Paragraphs are drawn from a ``random.Random(seed)`` shuffle of :func:`prose_paragraphs` and joined
    by blank lines; a paragraph repeats only once the whole pool (~40k tokens) has been used.
    """
    if n_tokens < 1:
        raise KVFoldError(f"haystack length must be at least 1 token, got {n_tokens}")
    pool = prose_paragraphs()
    rng = random.Random(seed)
    order: list[str] = []
    chosen: list[str] = []
    estimate = 0
    while estimate < n_tokens + 32:
        if not order:
            order = list(pool)
            rng.shuffle(order)
        chosen.append(order.pop())
        estimate += len(_ids(tokenizer, chosen[-1])) + 1
    text = "\n\n".join(chosen)
    cuts = [m.end() for m in _SENT_END.finditer(text)]
    lo, hi, best = 0, len(cuts) - 1, 0  # largest cut whose prefix fits
    while lo <= hi:
        mid = (lo + hi) // 2
        if len(_ids(tokenizer, text[:cuts[mid]])) <= n_tokens:
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    return text[:best]


def _insert(haystack: str, needle: str, depth: float) -> tuple[str, int]:
    """Put ``needle`` at the sentence boundary nearest ``depth`` of the haystack's characters."""
    bounds = [0] + [m.end() for m in _SENT_END.finditer(haystack)]
    pos = min(bounds, key=lambda b: (abs(b - depth * len(haystack)), b))
    before, after = haystack[:pos], haystack[pos:]
    if before:
        before += " "
    if after and not after[0].isspace():
        after = " " + after
    return before + needle + after, len(before)


def _token_span(tokenizer: Any, context: str, start: int, end: int) -> tuple[int, tuple[int, int]]:
    """(number of context tokens, [first, last+1) token span covering characters [start, end))."""
    try:
        offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets:
        first = next(i for i, (_, b) in enumerate(offsets) if b > start)
        last = max(i for i, (a, _) in enumerate(offsets) if a < end)
        return len(offsets), (first, last + 1)
    n = len(_ids(tokenizer, context))
    return n, (len(_ids(tokenizer, context[:start].rstrip())), min(n, len(_ids(tokenizer, context[:end]))))


def needle_sample(tokenizer: Any, *, length: int, depth: float, seed: int) -> Sample:
    """A needle-in-a-haystack sample of ~``length`` tokens (never more) with the needle at ``depth``.

    ``meta`` holds length, n_tokens (actual), depth, actual_depth (needle start / n_tokens), seed, key,
    needle, needle_char_offset and needle_token_span ([start, end) in the context's tokens, no specials).
    """
    if not isinstance(depth, (int, float)) or not math.isfinite(depth) or not 0.0 <= depth <= 1.0:
        raise KVFoldError(f"depth must be a number in [0, 1], got {depth!r}")
    if not isinstance(length, int) or isinstance(length, bool):
        raise KVFoldError(f"length must be an int number of tokens, got {length!r}")
    rng = random.Random(f"kvfold-niah-{seed}")
    key = "-".join(rng.sample(_WORDS, 2))
    value = str(rng.randint(1_000_000, 9_999_999))
    needle_len = len(_ids(tokenizer, " " + NEEDLE.format(key=key, value=value)))
    if length <= needle_len + MIN_SLACK:
        raise KVFoldError(f"length must be > {needle_len + MIN_SLACK} tokens (the needle's {needle_len} "
                          f"+ {MIN_SLACK} of haystack), got {length}")
    budget = length - needle_len - 2
    for _ in range(8):
        haystack = build_haystack(tokenizer, budget, seed)
        while value in haystack:
            value = str(rng.randint(1_000_000, 9_999_999))
        needle = NEEDLE.format(key=key, value=value)
        context, offset = _insert(haystack, needle, depth)
        n, span = _token_span(tokenizer, context, offset, offset + len(needle))
        if n <= length:
            break
        budget -= n - length
    else:  # pragma: no cover - the tokenizer would have to grow text wildly at the joins
        raise KVFoldError(f"could not fit a needle sample into {length} tokens")
    meta = {"length": length, "n_tokens": n, "depth": float(depth), "actual_depth": span[0] / n, "seed": seed,
            "key": key, "needle": needle, "needle_char_offset": offset, "needle_token_span": span}
    return Sample("niah", context, QUESTION.format(key=key), value, meta)


def needle_samples(tokenizer: Any, *, length: int, depths: Sequence[float], samples_per_depth: int = 1,
                   seed: int = 0) -> list[Sample]:
    """``samples_per_depth`` samples for each depth, depth-major; sample k gets seed ``seed * 1000003 + k``."""
    if isinstance(depths, (str, bytes)) or len(depths) == 0:
        raise KVFoldError(f"depths must be a non-empty sequence of numbers in [0, 1], got {depths!r}")
    if not isinstance(samples_per_depth, int) or samples_per_depth < 1:
        raise KVFoldError(f"samples_per_depth must be a positive int, got {samples_per_depth!r}")
    out: list[Sample] = []
    for depth in depths:
        for _ in range(samples_per_depth):
            out.append(needle_sample(tokenizer, length=length, depth=depth, seed=seed * _SEED_STRIDE + len(out)))
    return out


def score_contains(prediction: str, answer: str) -> float:
    """Substring-match accuracy: 1.0 if the stripped answer occurs in the stripped prediction, else 0.0.

    Case-sensitive and exact (for NIAH the answer is a 7-digit string, so extra words around it are
    fine but a wrong or partial number scores 0). An empty answer scores 0.0.
    """
    answer = answer.strip()
    return 1.0 if answer and answer in prediction.strip() else 0.0
