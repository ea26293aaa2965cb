"""Offline, seeded, deterministic long-context task samples (RULER / SCBench style), their registry and scoring.

Every generator takes a tokenizer, a ``length`` in tokens and a ``seed``; the same seed gives the same
sample, and the context has between ``length - LENGTH_TOLERANCE`` (64) and ``length`` tokens. Haystack
tasks hide short template sentences in English prose from CPython's own docs (see :mod:`.haystack`);
prose past the ~28k-token pool repeats paragraphs, while every hidden name and number is unique and
absent from the prose. Use :func:`make_samples` and :func:`score`; the prose/JSONL helpers are re-exported.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import KVFoldError, closest
from .haystack import (  # noqa: F401  (re-exported: older code imports these from here)
    LENGTH_TOLERANCE, MIN_SLACK, PERPLEXITY_TOLERANCE, _ids, _insert, _token_span, build_haystack, check_length, hide,
    perplexity_text, prose_paragraphs, prose_text, prose_words,
)
from .samples import METRICS, Answer, Sample, load_jsonl_tasks, score_contains, score_metric  # noqa: F401

TASKS: dict[str, str] = {
    "niah": "needle in a haystack: recall a 7-digit 'special magic number' hidden at a given depth of prose",
    "multikey": "multi-key needle: 4 magic numbers for different keys in prose, recall the one asked for",
    "multivalue": "multi-value needle: 4 magic numbers for one key in prose, recall all of them",
    "vt": "variable tracking: follow a chain of 'VAR X = VAR Y.' assignments past 2 distractor chains",
    "cwe": "common words extraction: name the 10 most frequent words of a long numbered word list",
    "multihop": "two-hop retrieval: the key opens a box, the box holds a number; 3 distractor key/box pairs",
    "multiturn": "shared context, 4 turns: each question asks for a different magic number in the same prose",
    "ppl": "perplexity: non-repeating prose compressed as context, its last quarter (at most 256 tokens) teacher-forced",
}
TASK_METRICS: dict[str, str] = {"niah": "contains", "multikey": "contains", "multivalue": "recall", "vt": "recall",
                                "cwe": "recall", "multihop": "contains", "multiturn": "contains", "ppl": "perplexity"}
PERPLEXITY = "perplexity"  # not a reply metric: the score is teacher-forced top-1 accuracy (kvfold.perplexity)
PPL_EVAL_TOKENS = 256

NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
QUESTION_ALL = "What are all the special magic numbers for {key} mentioned in the provided text?"
VT_VALUE, VT_LINK = "VAR {name} = {value}.", "VAR {name} = VAR {prev}."
VT_QUESTION = ("Find all variables that are assigned the value {value} in the text above, "
               "directly or through other variables.")
CWE_QUESTION = "What are the {n} most common words in the numbered list above?"
HOP_KEY, HOP_BOX = "The {key} key opens the {box} box.", "The {box} box holds the number {value}."
HOP_QUESTION = "What number is held by the box that the {key} key opens?"
CWE_MIN_LENGTH = 256

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
_SEED_STRIDE = 1_000_003


def needle_sample(tokenizer: Any, *, length: int, depth: float, seed: int) -> Sample:
    """A needle-in-a-haystack sample of ~``length`` tokens (never more) with the needle at ``depth``.

    ``meta`` holds length, n_tokens (actual), depth, actual_depth (needle start / n_tokens), seed, key,
    needle, needle_char_offset and needle_token_span ([start, end) in the context's tokens, no specials).
    """
    if not isinstance(depth, (int, float)) or not math.isfinite(depth) or not 0.0 <= depth <= 1.0:
        raise KVFoldError(f"depth must be a number in [0, 1], got {depth!r}")
    check_length(length)
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


def _fresh(rng: random.Random, make: Callable[[random.Random], str], used: set[str]) -> str:
    """A new ``make(rng)`` string that is not in the prose pool and neither contains nor is inside a used one."""
    for _ in range(10_000):
        s = make(rng)
        if s not in prose_text() and not any(s in u or u in s for u in used):
            used.add(s)
            return s
    raise KVFoldError("ran out of distinct names or numbers; ask for fewer keys, values or chains")


def _key(rng: random.Random) -> str:
    return "-".join(rng.sample(_WORDS, 2))


def _number(digits: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _name(rng: random.Random) -> str:
    return "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))


def _hidden(task: str, tokenizer: Any, length: int, seed: int, snippets: list[str], depths: list[float],
            question: str, answer: Answer, meta: dict, **turns: Any) -> Sample:
    """Hide ``snippets`` in prose and wrap the result; ``meta`` also records where each one landed."""
    h = hide(tokenizer, length=length, seed=seed, snippets=snippets, depths=depths, task=task)
    meta = {"length": length, "n_tokens": h.n_tokens, "seed": seed, "snippets": snippets, "depths": depths,
            "char_offsets": h.offsets, "token_spans": h.spans, **meta}
    return Sample(task, h.context, question, answer, meta, metric=TASK_METRICS[task], **turns)


def multikey_sample(tokenizer: Any, *, length: int, seed: int, keys: int = 4) -> Sample:
    """``keys`` magic-number needles with distinct keys at random depths; the question asks for one of them."""
    rng, used = random.Random(f"kvfold-multikey-{seed}"), set()
    names = [_fresh(rng, _key, used) for _ in range(keys)]
    values = [_fresh(rng, _number(7), used) for _ in range(keys)]
    target = rng.randrange(keys)
    snippets = [NEEDLE.format(key=k, value=v) for k, v in zip(names, values)]
    return _hidden("multikey", tokenizer, length, seed, snippets, [rng.random() for _ in snippets],
                   QUESTION.format(key=names[target]), values[target], {"keys": names, "target": target})


def multivalue_sample(tokenizer: Any, *, length: int, seed: int, values: int = 4) -> Sample:
    """``values`` magic-number needles for one key at random depths; the answer is all values (scored by recall)."""
    rng, used = random.Random(f"kvfold-multivalue-{seed}"), set()
    key = _fresh(rng, _key, used)
    numbers = [_fresh(rng, _number(7), used) for _ in range(values)]
    snippets = [NEEDLE.format(key=key, value=v) for v in numbers]
    return _hidden("multivalue", tokenizer, length, seed, snippets, [rng.random() for _ in snippets],
                   QUESTION_ALL.format(key=key), tuple(numbers), {"key": key})


def vt_sample(tokenizer: Any, *, length: int, seed: int, hops: int = 4, distractors: int = 2) -> Sample:
    """Variable tracking (RULER): ``VAR A = 12345.`` then ``VAR B = VAR A.`` ... (``hops`` links, in reading
    order at random depths) plus ``distractors`` chains with other values. The answer is the first chain's
    ``hops + 1`` variables, scored by recall: naming extra (distractor) variables is not penalised."""
    rng, used = random.Random(f"kvfold-vt-{seed}"), set()
    chains = [[_fresh(rng, _name, used) for _ in range(hops + 1)] for _ in range(distractors + 1)]
    values = [_fresh(rng, _number(5), used) for _ in chains]
    snippets, depths = [], []
    for names, value in zip(chains, values):
        snippets += [VT_VALUE.format(name=names[0], value=value)]
        snippets += [VT_LINK.format(name=b, prev=a) for a, b in zip(names, names[1:])]
        depths += sorted(rng.random() for _ in names)
    return _hidden("vt", tokenizer, length, seed, snippets, depths, VT_QUESTION.format(value=values[0]),
                   tuple(chains[0]), {"chains": chains, "values": values})


def multihop_sample(tokenizer: Any, *, length: int, seed: int, distractors: int = 3) -> Sample:
    """Two facts to chain, "The K key opens the B box." and "The B box holds the number V.", at random depths
    among ``distractors`` other key/box/number triples; the question names K, the answer is V."""
    rng, used = random.Random(f"kvfold-multihop-{seed}"), set()
    for _ in range(10_000):
        words = rng.sample(_WORDS, 2 * (distractors + 1))
        if not any(f"{w} key" in prose_text() or f"{w} box" in prose_text() for w in words):
            break
    else:  # pragma: no cover - the prose would have to mention most "<word> key"s
        raise KVFoldError("multihop found no key/box words absent from the prose")
    keys, boxes = words[:distractors + 1], words[distractors + 1:]
    values = [_fresh(rng, _number(7), used) for _ in keys]
    snippets = [HOP_KEY.format(key=k, box=b) for k, b in zip(keys, boxes)]
    snippets += [HOP_BOX.format(box=b, value=v) for b, v in zip(boxes, values)]
    return _hidden("multihop", tokenizer, length, seed, snippets, [rng.random() for _ in snippets],
                   HOP_QUESTION.format(key=keys[0]), values[0], {"keys": keys, "boxes": boxes, "values": values})


def multiturn_sample(tokenizer: Any, *, length: int, seed: int, turns: int = 4) -> Sample:
    """SCBench-style shared context: ``turns`` needles with distinct keys, asked one per turn in a seeded
    order (not the reading order); ``questions``/``answers`` hold every turn, ``question``/``answer`` the first."""
    rng, used = random.Random(f"kvfold-multiturn-{seed}"), set()
    keys = [_fresh(rng, _key, used) for _ in range(turns)]
    values = [_fresh(rng, _number(7), used) for _ in range(turns)]
    snippets = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    depths = [rng.random() for _ in snippets]
    order = rng.sample(range(turns), turns)
    questions = tuple(QUESTION.format(key=keys[i]) for i in order)
    answers = tuple(values[i] for i in order)
    return _hidden("multiturn", tokenizer, length, seed, snippets, depths, questions[0], answers[0],
                   {"keys": keys, "order": order}, questions=questions, answers=answers)


def cwe_sample(tokenizer: Any, *, length: int, seed: int, common: int = 10) -> Sample:
    """Common words extraction (RULER): the context is a numbered list ("1. word" lines) of prose words where
    ``common`` words appear C times each (C = length // 160, clamped to 3..30) and the rest at most
    R = clamp(C // 4, 1, 3) times each; the answer is the ``common`` words, scored by recall. The list is
    as long as fits in ``length`` tokens; past what ~1,600 distinct words can fill, the error names the maximum."""
    if check_length(length) < CWE_MIN_LENGTH:
        raise KVFoldError(f"cwe needs length >= {CWE_MIN_LENGTH} tokens, got {length}")
    rng = random.Random(f"kvfold-cwe-{seed}")
    words = list(prose_words())
    rng.shuffle(words)
    top, rest = words[:common], words[common:]
    c = min(30, max(3, length // 160))
    r = min(3, max(1, c // 4))

    def listing(n_items: int) -> str:
        items = [w for w in top for _ in range(c)] + [rest[j // r] for j in range(n_items - common * c)]
        random.Random(f"kvfold-cwe-order-{seed}").shuffle(items)
        return "\n".join(f"{i}. {w}" for i, w in enumerate(items, start=1))

    lo, hi = common * (c + 1), min(common * c + len(rest) * r, length)  # an item is at least one token
    best, best_n = None, 0
    while lo <= hi:  # the largest list that fits; token counts grow with the number of items
        mid = (lo + hi) // 2
        text = listing(mid)
        if (n := len(_ids(tokenizer, text))) <= length:
            best, best_n, n_items, lo = text, n, mid, mid + 1
        else:
            hi = mid - 1
    if best is None:  # pragma: no cover - only a tokenizer with very long words
        raise KVFoldError(f"cwe could not fit {common * (c + 1)} list items into {length} tokens")
    if best_n < length - LENGTH_TOLERANCE:
        raise KVFoldError(f"cwe supports at most {best_n} tokens with this tokenizer (every word used), got {length}")
    meta = {"length": length, "n_tokens": best_n, "seed": seed, "n_items": n_items, "common_count": c,
            "rare_max_count": r}
    return Sample("cwe", best, CWE_QUESTION.format(n=common), tuple(top), meta, metric="recall")


def _niah(tokenizer: Any, *, length: int, seed: int, k: int, samples: int) -> Sample:
    """make_samples' NIAH: depths spread evenly over 0.1..0.9 (0.5 for one sample), as in the demo."""
    depth = 0.1 + 0.8 * k / (samples - 1) if samples > 1 else 0.5
    return needle_sample(tokenizer, length=length, depth=depth, seed=seed)


def ppl_sample(tokenizer: Any, *, length: int, seed: int) -> Sample:
    """Prose for teacher-forced perplexity (:func:`perplexity_text`): no question; ``meta["eval_tokens"]`` (the last
    quarter of ``length``, at most 256) are scored, the rest is the compressed context."""
    text = perplexity_text(tokenizer, length, seed)
    n_tokens = len(_ids(tokenizer, text))
    return Sample("ppl", text, "", "", {"length": length, "n_tokens": n_tokens, "seed": seed,
                                        "eval_tokens": min(PPL_EVAL_TOKENS, max(1, length // 4))},
                  metric=PERPLEXITY)


_GENERATORS: dict[str, Callable[..., Sample]] = {
    "multikey": multikey_sample, "multivalue": multivalue_sample, "vt": vt_sample, "cwe": cwe_sample,
    "multihop": multihop_sample, "multiturn": multiturn_sample, "ppl": ppl_sample,
}


def make_samples(task: str, tokenizer: Any, *, length: int, samples: int, seed: int = 0) -> list[Sample]:
    """``samples`` samples of ``task`` (a :data:`TASKS` name), each of ``length - LENGTH_TOLERANCE`` to ``length``
    tokens; sample k gets
    seed ``seed * 1000003 + k``, so the list is deterministic and its items differ."""
    if not isinstance(task, str) or task not in TASKS:
        raise KVFoldError(f"unknown task {task!r}{closest(str(task), TASKS)}; valid: {', '.join(TASKS)}")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise KVFoldError(f"samples must be a positive int, got {samples!r}")
    check_length(length)
    seeds = [seed * _SEED_STRIDE + k for k in range(samples)]
    if task == "niah":
        return [_niah(tokenizer, length=length, seed=s, k=k, samples=samples) for k, s in enumerate(seeds)]
    return [_GENERATORS[task](tokenizer, length=length, seed=s) for s in seeds]


def score(task_or_metric: str, prediction: str, answer: Answer | Sequence[str]) -> float:
    """Score a reply in [0, 1] with a task's metric (:data:`TASK_METRICS`) or a metric name (:data:`METRICS`).

    For a JSONL sample pass ``sample.metric``; for a multi-turn sample score each ``answers[i]`` in turn.
    """
    metric = TASK_METRICS.get(task_or_metric, task_or_metric) if isinstance(task_or_metric, str) else None
    if metric not in METRICS:
        names = [*TASKS, *METRICS]
        raise KVFoldError(f"unknown task or metric {task_or_metric!r}{closest(str(task_or_metric), names)}; "
                          f"valid: {', '.join(names)}")
    return score_metric(metric, prediction, answer)
