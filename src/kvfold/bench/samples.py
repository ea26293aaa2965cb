"""What a task sample is, how a reply is scored against its answer, and user samples from a JSONL file."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import KVFoldError, closest

Answer = Union[str, tuple[str, ...]]  # one string, or several (alternatives for contains/exact, items for recall)
METRICS: dict[str, str] = {
    "contains": "1 if the (any alternative) answer occurs in the reply as a case-sensitive substring, else 0",
    "exact": "1 if the stripped reply equals the (any alternative) stripped answer, case-sensitive, else 0",
    "recall": "fraction of the answer's items found in the reply as whole words, case-insensitive; extras are free",
}
JSONL_FIELDS = ("context", "questions", "answers", "metric", "task")


@dataclass(frozen=True)
class Sample:
    """One task instance: feed ``context`` then ``question``; score the reply against ``answer`` with ``metric``.

    ``answer`` is a string, or a tuple of strings for tasks scored by recall (each item counts). For a
    multi-turn sample ``questions``/``answers`` hold every turn over the same context and ``question``/
    ``answer`` are the first; for the others they default to the one-element ``(question,)``/``(answer,)``.
    """

    task: str
    context: str
    question: str
    answer: Answer
    meta: dict
    questions: tuple[str, ...] = ()
    answers: tuple[Answer, ...] = ()
    metric: str = "contains"

    def __post_init__(self) -> None:
        if not self.questions:
            object.__setattr__(self, "questions", (self.question,))
        if not self.answers:
            object.__setattr__(self, "answers", (self.answer,))


def score_contains(prediction: str, answer: str) -> float:
    """Substring-match accuracy: 1.0 if the stripped answer occurs in the stripped prediction, else 0.0.

    Case-sensitive and exact (for NIAH the answer is a 7-digit string, so extra words around it are
    fine but a wrong or partial number scores 0). An empty answer scores 0.0.
    """
    answer = answer.strip()
    return 1.0 if answer and answer in prediction.strip() else 0.0


def score_exact(prediction: str, answer: str) -> float:
    """1.0 if the prediction equals the answer once both are stripped of surrounding whitespace, else 0.0."""
    answer = answer.strip()
    return 1.0 if answer and prediction.strip() == answer else 0.0


def score_recall(prediction: str, items: Sequence[str]) -> float:
    """Fraction of ``items`` that occur in the prediction as whole words (not inside a longer word or number).

    Case-insensitive. Extra words in the prediction are not penalised (recall, not F1, as in RULER), so
    listing every candidate scores 1.0; an empty item never matches.
    """
    found = [bool(i.strip()) and re.search(rf"(?<!\w){re.escape(i.strip())}(?!\w)", prediction, re.IGNORECASE)
             is not None for i in items]
    return sum(found) / len(found) if found else 0.0


def score_metric(metric: str, prediction: str, answer: Answer | Sequence[str]) -> float:
    """Score with a metric name from :data:`METRICS`; a sequence answer means alternatives (best one) for
    contains/exact and items for recall."""
    if metric not in METRICS:
        raise KVFoldError(f"unknown metric {metric!r}{closest(metric, METRICS)}; valid: {', '.join(METRICS)}")
    golds = (answer,) if isinstance(answer, str) else tuple(answer)
    if not golds or not all(isinstance(g, str) for g in golds):
        raise KVFoldError(f"an answer must be a string or a non-empty list of strings, got {answer!r}")
    if metric == "recall":
        return score_recall(prediction, golds)
    one = score_contains if metric == "contains" else score_exact
    return max(one(prediction, g) for g in golds)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)


def _sample_from(row: Any, path: Path, line: int) -> Sample:
    """Validate one parsed JSONL row; every problem names the file and the 1-based line."""
    where, meta = f"{path}:{line}", {"source": str(path), "line": line}
    if not isinstance(row, dict):
        raise KVFoldError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in row:
        if key not in JSONL_FIELDS:
            raise KVFoldError(f"{where}: unknown field {key!r}{closest(key, JSONL_FIELDS)}; "
                              f"fields: {', '.join(JSONL_FIELDS)}")
    for key in ("context", "questions", "answers"):
        if key not in row:
            raise KVFoldError(f"{where}: missing field {key!r}")
    context, questions, answers = row["context"], row["questions"], row["answers"]
    if not isinstance(context, str) or not context.strip():
        raise KVFoldError(f"{where}: 'context' must be a non-empty string")
    if not _strings(questions):
        raise KVFoldError(f"{where}: 'questions' must be a non-empty list of non-empty strings")
    if not isinstance(answers, list) or not all((isinstance(a, str) and a.strip()) or _strings(a) for a in answers):
        raise KVFoldError(f"{where}: 'answers' must be a list whose items are non-empty strings or "
                          "non-empty lists of non-empty strings")
    if len(answers) != len(questions):
        raise KVFoldError(f"{where}: {len(questions)} questions but {len(answers)} answers (one answer per question)")
    metric = row.get("metric", "contains")
    if metric not in METRICS:
        raise KVFoldError(f"{where}: unknown metric {metric!r}{closest(str(metric), METRICS)}; "
                          f"valid: {', '.join(METRICS)}")
    task = row.get("task", "jsonl")
    if not isinstance(task, str) or not task.strip():
        raise KVFoldError(f"{where}: 'task' must be a non-empty string")
    golds = tuple(a if isinstance(a, str) else tuple(a) for a in answers)
    return Sample(task, context, questions[0], golds[0], meta, tuple(questions), golds, metric)


def load_jsonl_tasks(path: str | Path) -> list[Sample]:
    """User samples from a JSONL file, one JSON object a line (blank lines are skipped).

    Fields: ``context`` (str), ``questions`` (list of str), ``answers`` (one per question: a str, or a
    list of str: alternatives for contains/exact, items for recall), optional ``metric``
    (contains | exact | recall, default contains) and ``task`` (default "jsonl"). The first bad line
    raises :class:`KVFoldError` naming the file, the 1-based line and the problem (nothing after it is
    loaded, so no line is ever dropped silently); a file with no samples is an error too.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KVFoldError(f"cannot read task file {path}: {exc}") from exc
    out: list[Sample] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KVFoldError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        out.append(_sample_from(row, path, number))
    if not out:
        raise KVFoldError(f"{path}: no samples (the file is empty)")
    return out
