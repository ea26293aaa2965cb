"""What one inspection pass reads: a task sample as the chat prompt `kvfold generate` builds (with where its
needles and question sit), or a text file as is."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import KVFoldError, closest


@dataclass(frozen=True)
class InspectInput:
    """The token ids of one pass, what they are, where the needle(s) and the question sit ([start, end) spans)."""

    ids: tuple[int, ...]
    description: dict
    needle_spans: tuple[tuple[int, int], ...] = ()
    question_span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.ids) < 2:
            raise KVFoldError("inspect needs at least 2 tokens of input: give a longer --text or --length")
        for start, end in (*self.needle_spans, *([self.question_span] if self.question_span else [])):
            if not 0 <= start < end <= len(self.ids):
                raise KVFoldError(f"span [{start}, {end}) is outside the {len(self.ids)} input tokens")


def parse_length(text: str | int) -> int:
    """'4096', '4k' (x1024) or an int -> tokens."""
    raw = str(text).strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    try:
        value = int(float(raw[:-1]) * scale) if scale > 1 else int(raw)
    except ValueError:
        raise KVFoldError(f"--length takes a number of tokens like 2048 or 4k, got '{text}'") from None
    if value < 2:
        raise KVFoldError(f"--length must be at least 2 tokens, got '{text}'")
    return value


def _relevant_snippets(sample) -> list[str]:
    """The hidden sentences a task sample's (first) question asks for."""
    meta, snippets = sample.meta, sample.meta.get("snippets", [])
    if sample.task == "niah":
        return [meta["needle"]]
    if sample.task == "multikey":
        return [snippets[meta["target"]]]
    if sample.task == "vt":
        return snippets[:len(meta["chains"][0])]
    if sample.task == "multihop":
        return [snippets[0], snippets[len(meta["keys"])]]
    if sample.task == "multiturn":
        return [snippets[meta["order"][0]]]
    return list(snippets)  # multivalue: every value; cwe: none


def _find_span(tokenizer, ids: Sequence[int], text: str) -> tuple[int, int] | None:
    """Where `text`'s tokens occur in `ids` (tried with a leading space, bare, and trimmed by one token at the
    joins, where neighbouring text can merge tokens)."""
    for variant in (" " + text, text):
        tokens = list(tokenizer(variant, add_special_tokens=False)["input_ids"])
        for lo, hi in ((0, len(tokens)), (1, len(tokens)), (0, len(tokens) - 1), (1, len(tokens) - 1)):
            part = tokens[lo:hi]
            if len(part) < 2:
                continue
            for start in range(len(ids) - len(part) + 1):
                if list(ids[start:start + len(part)]) == part:
                    return start - lo, start - lo + len(tokens)
    return None


def task_input(tokenizer, task: str, length: int, seed: int = 0, depth: float = 0.5) -> InspectInput:
    """A seeded task sample as the chat prompt `kvfold generate` builds (context, then the first question)."""
    from ..api import split_prompt
    from ..bench.tasks import TASKS, make_samples, needle_sample

    if task not in TASKS:
        raise KVFoldError(f"unknown task '{task}'{closest(task, TASKS)}; valid: {', '.join(TASKS)}")
    sample = (needle_sample(tokenizer, length=length, depth=depth, seed=seed) if task == "niah"
              else make_samples(task, tokenizer, length=length, samples=1, seed=seed)[0])
    head, tail = split_prompt(tokenizer, sample.context, sample.question)
    spans, missing = [], 0
    for snippet in _relevant_snippets(sample):
        span = _find_span(tokenizer, head, snippet)
        if span is None:
            missing += 1
        else:
            spans.append((max(0, span[0]), min(len(head), span[1])))
    description = {"source": "task", "task": task, "length": length, "seed": seed, "question": sample.question,
                   "needles": _relevant_snippets(sample), "needles_not_located": missing}
    if task == "niah":
        description["depth"] = depth
    return InspectInput(tuple(head + tail), description, tuple(spans), (len(head), len(head) + len(tail)))


def text_input(tokenizer, path: str | Path, length: int | None = None) -> InspectInput:
    """The text of a file, tokenized as is (with the tokenizer's own special tokens), cut to `length` tokens."""
    path = Path(path)
    if not path.is_file():
        raise KVFoldError(f"text file '{path}' does not exist: pass an existing file to --text")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KVFoldError(f"'{path}' is not UTF-8 text: pass a plain-text file to --text") from None
    if not text.strip():
        raise KVFoldError(f"text file '{path}' is empty: give some text to inspect")
    ids = list(tokenizer(text)["input_ids"])
    description = {"source": "text", "file": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "tokens_in_file": len(ids)}
    if length is not None:
        ids = ids[:length]
        description["length"] = length
    return InspectInput(tuple(ids), description)
