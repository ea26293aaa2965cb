"""Offline English prose (CPython's ``pydoc_data.topics``) and helpers that hide sentences in it at a token budget.

Nothing is downloaded and no text is pasted into the repo: the reference docs ship with every CPython.
Code, grammar rules, tables and headings are dropped; see :func:`prose_paragraphs`.
"""

from __future__ import annotations

import functools
import random
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import KVFoldError

MIN_SLACK = 64  # a context must have room for at least this many haystack tokens besides the inserted sentences
LENGTH_TOLERANCE = 64  # generated contexts have between length - LENGTH_TOLERANCE and length tokens
PERPLEXITY_TOLERANCE = 16  # perplexity_text is cut after a whole word: between length - 16 and length tokens

_MIN_SENTENCES = 2
_MAX_SENTENCE_CHARS = 240  # keeps trimming at a sentence boundary within ~60 tokens of the target
# End of a sentence: terminal punctuation (plus closing quote/paren) followed by a capitalised start or the end.
_SENT_END = re.compile(r"[.!?][\"”’)]?(?=\s+[\"“(A-Z]|\s*$)")
_SYMBOLS = set("=<>{}[]|\\/#@$%^~`+&_")


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


@functools.lru_cache(maxsize=1)
def prose_text() -> str:
    """All of :func:`prose_paragraphs` in one string, to check that a generated secret never occurs in any haystack."""
    return "\n\n".join(prose_paragraphs())


@functools.lru_cache(maxsize=1)
def prose_words() -> tuple[str, ...]:
    """The distinct all-lowercase words of 3 to 10 letters in the prose (about 2,000), sorted.

    A word is a whitespace-separated piece, less an opening parenthesis and closing punctuation, made of
    letters only (so ``os.path``, ``built-in`` and ``__init__`` are not words).
    """
    pieces = (p.lstrip("(").rstrip(",.;:!?)") for p in prose_text().split())
    return tuple(sorted({p for p in pieces if re.fullmatch(r"[a-z]{3,10}", p)}))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_length(length: Any) -> int:
    """``length`` must be an int number of tokens (not a float or a bool)."""
    if not isinstance(length, int) or isinstance(length, bool):
        raise KVFoldError(f"length must be an int number of tokens, got {length!r}")
    return length


def _largest_fitting(tokenizer: Any, text: str, cuts: Sequence[int], n_tokens: int) -> int:
    """The largest cut (from ascending ``cuts``) whose prefix has at most ``n_tokens`` tokens, else 0."""
    lo, hi, best = 0, len(cuts) - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if len(_ids(tokenizer, text[:cuts[mid]])) <= n_tokens:
            best, lo = cuts[mid], mid + 1
        else:
            hi = mid - 1
    return best


def build_haystack(tokenizer: Any, n_tokens: int, seed: int) -> str:
    """Seeded prose of at most ``n_tokens`` tokens (and at least ~``n_tokens - 60``), cut at a sentence end.

    Paragraphs are drawn from a ``random.Random(seed)`` shuffle of :func:`prose_paragraphs` and joined
    by blank lines; a paragraph repeats only once the whole pool (~28k SmolLM2 tokens) has been used.
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
    return text[:_largest_fitting(tokenizer, text, [m.end() for m in _SENT_END.finditer(text)], n_tokens)]


def perplexity_text(tokenizer: Any, length: int, seed: int) -> str:
    """Seeded prose for teacher-forced perplexity: at most ``length`` tokens and at least ``length - 16``.

    Like :func:`build_haystack` but cut after a whole word rather than a sentence, and never repeating a
    paragraph (a model could copy a repeat, which would deflate perplexity), so ``length`` is capped by
    the pool; past it a :class:`KVFoldError` names the maximum for this tokenizer and seed.
    """
    if check_length(length) < 1:
        raise KVFoldError(f"length must be at least 1 token, got {length}")
    order = list(prose_paragraphs())
    random.Random(f"kvfold-perplexity-{seed}").shuffle(order)
    chosen: list[str] = []
    estimate = 0
    while estimate < length + 32 and order:
        chosen.append(order.pop())
        estimate += len(_ids(tokenizer, chosen[-1])) + 1
    text = "\n\n".join(chosen)
    if not order and (total := len(_ids(tokenizer, text))) < length:
        raise KVFoldError(f"perplexity_text has at most {total} tokens of non-repeating prose for this "
                          f"tokenizer; got length={length}")
    cuts = [m.start() for m in re.finditer(r"(?<=\S)\s", text)] + [len(text)]
    return text[:_largest_fitting(tokenizer, text, cuts, length)]


def insert_snippets(haystack: str, snippets: Sequence[str], depths: Sequence[float]) -> tuple[str, list[int]]:
    """Put each snippet at the sentence boundary nearest its ``depth`` of the haystack's characters.

    Returns the new text and each snippet's character offset in it. Snippets that land on the same
    boundary keep their list order (so a chain listed in order reads in order), separated by a space.
    """
    bounds = [0] + [m.end() for m in _SENT_END.finditer(haystack)]
    targets = [min(bounds, key=lambda b: (abs(b - d * len(haystack)), b)) for d in depths]
    out, prev, offsets = "", 0, [0] * len(snippets)
    for i in [*sorted(range(len(snippets)), key=targets.__getitem__), None]:
        chunk = haystack[prev:] if i is None else haystack[prev:targets[i]]
        if out and chunk and not chunk[0].isspace():  # text right after a snippet placed at the very start
            chunk = " " + chunk
        out += chunk
        if i is not None:
            prev = targets[i]
            out += " " if out else ""
            offsets[i] = len(out)
            out += snippets[i]
    return out, offsets


def _insert(haystack: str, needle: str, depth: float) -> tuple[str, int]:
    """Put ``needle`` at the sentence boundary nearest ``depth`` of the haystack's characters."""
    context, offsets = insert_snippets(haystack, [needle], [depth])
    return context, offsets[0]


def token_spans(tokenizer: Any, context: str, char_spans: Sequence[tuple[int, int]]
                ) -> tuple[int, list[tuple[int, int]]]:
    """(number of context tokens, the [first, last+1) token span covering each [start, end) character span)."""
    try:
        offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    spans: list[tuple[int, int]] = []
    if offsets:
        for start, end in char_spans:
            first = next(i for i, (_, b) in enumerate(offsets) if b > start)
            last = max(i for i, (a, _) in enumerate(offsets) if a < end)
            spans.append((first, last + 1))
        return len(offsets), spans
    n = len(_ids(tokenizer, context))
    for start, end in char_spans:
        spans.append((len(_ids(tokenizer, context[:start].rstrip())), min(n, len(_ids(tokenizer, context[:end])))))
    return n, spans


def _token_span(tokenizer: Any, context: str, start: int, end: int) -> tuple[int, tuple[int, int]]:
    """(number of context tokens, [first, last+1) token span covering characters [start, end))."""
    n, spans = token_spans(tokenizer, context, [(start, end)])
    return n, spans[0]


@dataclass(frozen=True)
class Hidden:
    """Prose with sentences hidden in it: ``offsets`` (characters) and ``spans`` (tokens) per sentence."""

    context: str
    n_tokens: int
    offsets: list[int]
    spans: list[tuple[int, int]]


def hide(tokenizer: Any, *, length: int, seed: int, snippets: Sequence[str], depths: Sequence[float],
         task: str) -> Hidden:
    """Hide ``snippets`` at ``depths`` in seeded prose: between ``length - LENGTH_TOLERANCE`` and ``length`` tokens.

    The haystack budget starts at ``length`` minus the snippets' tokens and is corrected from the
    measured count (a few tries, the longest fit wins), since joins can merge or split tokens.
    Raises :class:`KVFoldError` naming the minimum when ``length`` has no room for ``MIN_SLACK`` prose.
    """
    cost = sum(len(_ids(tokenizer, " " + s)) for s in snippets)
    if check_length(length) <= cost + MIN_SLACK:
        raise KVFoldError(f"{task} needs length > {cost + MIN_SLACK} tokens (its {len(snippets)} inserted "
                          f"sentences take {cost} + {MIN_SLACK} of prose), got {length}")
    budget, tried, best = length - cost, set(), None
    for _ in range(4):
        if budget in tried or budget < 1:
            break
        tried.add(budget)
        context, offsets = insert_snippets(build_haystack(tokenizer, budget, seed), snippets, depths)
        n, spans = token_spans(tokenizer, context, [(o, o + len(s)) for o, s in zip(offsets, snippets)])
        if n <= length and (best is None or n > best.n_tokens):
            best = Hidden(context, n, offsets, spans)
        if length - LENGTH_TOLERANCE // 4 <= n <= length:
            break
        budget += length - n
    if best is None:  # pragma: no cover - the tokenizer would have to grow text wildly at the joins
        raise KVFoldError(f"could not fit a {task} sample into {length} tokens")
    return best
