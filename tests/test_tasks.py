"""Long-context task samples: seeded, offline, deterministic, exact in length, answers really in the context."""

from __future__ import annotations

import collections
import json
import re

import pytest

from kvfold.bench.tasks import (
    LENGTH_TOLERANCE, PERPLEXITY_TOLERANCE, TASK_METRICS, TASKS, Sample, build_haystack, load_jsonl_tasks,
    make_samples, needle_sample, needle_samples, perplexity_text, prose_paragraphs, score, score_contains,
)
from kvfold.errors import KVFoldError



@pytest.fixture(scope="module")
def tok(embedded_tokenizer):
    return embedded_tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_task_registry():
    assert set(TASKS) == {"niah", "multikey", "multivalue", "vt", "cwe", "multihop", "multiturn", "ppl"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in TASKS.values())
    assert set(TASK_METRICS) == set(TASKS)


def test_deterministic_per_seed(tok):
    a = needle_sample(tok, length=1500, depth=0.5, seed=3)
    b = needle_sample(tok, length=1500, depth=0.5, seed=3)
    c = needle_sample(tok, length=1500, depth=0.5, seed=4)
    assert isinstance(a, Sample) and a == b
    assert a.context != c.context
    assert build_haystack(tok, 800, seed=1) == build_haystack(tok, 800, seed=1) != build_haystack(tok, 800, seed=2)


@pytest.mark.parametrize("length", [600, 4000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_length_needle_and_span(tok, length, depth):
    s = needle_sample(tok, length=length, depth=depth, seed=11)
    context_ids = ids(tok, s.context)
    assert length - 64 <= len(context_ids) <= length
    assert s.meta["n_tokens"] == len(context_ids) and s.meta["length"] == length
    assert s.task == "niah" and re.fullmatch(r"[1-9]\d{6}", s.answer)
    needle = f"The special magic number for {s.meta['key']} is: {s.answer}."
    assert s.meta["needle"] == needle and s.meta["key"] in s.question
    assert s.context.count(needle) == 1 and s.context.count(s.answer) == 1
    assert s.context.count("special magic number") == 1
    assert s.context[s.meta["needle_char_offset"]:].startswith(needle)
    start, end = s.meta["needle_token_span"]
    assert 0 <= start < end <= len(context_ids)
    decoded = tok.decode(context_ids[start:end])
    assert s.answer in decoded and "magic number" in decoded
    assert end - start <= len(ids(tok, " " + needle)) + 1
    if depth == 0.0:
        assert s.context.startswith(needle)
    if depth == 1.0:
        assert s.context.endswith(needle)


def test_depth_places_needle(tok):
    for depth, lo, hi in [(0.1, 0.0, 0.2), (0.9, 0.8, 1.0)]:
        s = needle_sample(tok, length=3000, depth=depth, seed=5)
        start, _ = s.meta["needle_token_span"]
        assert lo <= start / s.meta["n_tokens"] <= hi, (depth, start, s.meta["n_tokens"])
        assert s.meta["actual_depth"] == start / s.meta["n_tokens"]


def test_haystack_has_no_repeats_and_is_prose(tok):
    hay = build_haystack(tok, 4000, seed=0)
    assert 4000 - 64 <= len(ids(tok, hay)) <= 4000
    paragraphs = hay.split("\n\n")
    assert len(paragraphs) == len(set(paragraphs)) > 10
    pool = set(prose_paragraphs())
    assert all(p in pool for p in paragraphs[:-1])  # the last one may be cut at a sentence end
    assert any(p.startswith(paragraphs[-1]) for p in pool) and paragraphs[-1][-1] in ".!?\"”’)"
    for text in [hay, *prose_paragraphs()]:
        assert ">>>" not in text and "::=" not in text and "\n   " not in text
    assert len(pool) > 300


def test_needle_samples_distinct(tok):
    samples = needle_samples(tok, length=500, depths=[0.25, 0.75], samples_per_depth=2, seed=1)
    assert [s.meta["depth"] for s in samples] == [0.25, 0.25, 0.75, 0.75]
    assert len({s.meta["seed"] for s in samples}) == 4
    assert len({s.context for s in samples}) == 4
    assert samples == needle_samples(tok, length=500, depths=[0.25, 0.75], samples_per_depth=2, seed=1)


@pytest.mark.parametrize("kwargs", [
    {"length": 50, "depth": 0.5},
    {"length": 70, "depth": 0.5},
    {"length": 1000, "depth": -0.1},
    {"length": 1000, "depth": 1.5},
    {"length": 1000, "depth": float("nan")},
    {"length": 1000.0, "depth": 0.5},
])
def test_bad_arguments(tok, kwargs):
    with pytest.raises(KVFoldError):
        needle_sample(tok, seed=0, **kwargs)


def test_bad_batch_arguments(tok):
    with pytest.raises(KVFoldError):
        needle_samples(tok, length=1000, depths=[])
    with pytest.raises(KVFoldError):
        needle_samples(tok, length=1000, depths=[0.5], samples_per_depth=0)
    with pytest.raises(KVFoldError, match="depth"):
        needle_samples(tok, length=1000, depths=[0.5, 2.0])


class WordTokenizer:
    """A slow-style tokenizer without offsets: whitespace-separated words are tokens."""

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("no offsets in a slow tokenizer")
        return {"input_ids": text.split()}


def test_span_without_offsets():
    s = needle_sample(WordTokenizer(), length=700, depth=0.3, seed=2)
    words = s.context.split()
    assert 700 - 64 <= len(words) <= 700
    start, end = s.meta["needle_token_span"]
    assert " ".join(words[start:end]) == s.meta["needle"]


def test_score_contains():
    assert score_contains("The special magic number is 1234567.", "1234567") == 1.0
    assert score_contains("  1234567\n", " 1234567 ") == 1.0
    assert score_contains("123456", "1234567") == 0.0
    assert score_contains("anything", "") == 0.0


# ---- the RULER / SCBench-style tasks, make_samples, score, perplexity_text, JSONL ----

NEW_TASKS = ["multikey", "multivalue", "vt", "cwe", "multihop", "multiturn"]


@pytest.fixture(scope="module")
def made(tok):
    """make_samples(task, tok, length=..., samples=..., seed=...), memoised across the module's tests."""
    cache: dict = {}

    def get(task: str, length: int = 1200, samples: int = 2, seed: int = 0) -> list[Sample]:
        key = (task, length, samples, seed)
        if key not in cache:
            cache[key] = make_samples(task, tok, length=length, samples=samples, seed=seed)
        return cache[key]

    return get


def right_answer(s: Sample) -> str:
    return ", ".join(s.answer) if isinstance(s.answer, tuple) else f"The answer is {s.answer}."


@pytest.mark.parametrize("task", sorted(set(TASKS) - {"ppl"}))
def test_make_samples_deterministic_per_seed(tok, made, task):
    a = made(task)
    again = make_samples(task, tok, length=1200, samples=2, seed=0)
    assert a == again and all(isinstance(s, Sample) and s.task == task for s in a)
    assert a[0].context != a[1].context and a[0].answer != a[1].answer  # samples of one call differ
    other = made(task, seed=1)
    assert other[0].context != a[0].context and other[0].answer != a[0].answer
    assert all(s.metric == TASK_METRICS[task] for s in a)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [400, 1200, 3000])
def test_length_within_tolerance_never_over(tok, made, task, length):
    for s in made(task, length=length):
        n = len(ids(tok, s.context))
        assert length - LENGTH_TOLERANCE <= n <= length, (task, length, n)
        assert s.meta["n_tokens"] == n and s.meta["length"] == length


@pytest.mark.parametrize("task", [t for t in NEW_TASKS if t != "cwe"])
def test_snippets_once_at_their_offsets_and_spans(tok, made, task):
    for s in made(task):
        context_ids = ids(tok, s.context)
        assert len(s.meta["snippets"]) == len(s.meta["char_offsets"]) == len(s.meta["token_spans"])
        for snippet, offset, (start, end) in zip(s.meta["snippets"], s.meta["char_offsets"], s.meta["token_spans"]):
            assert s.context.count(snippet) == 1 and s.context[offset:].startswith(snippet)
            before, after = s.context[offset - 1:offset], s.context[offset + len(snippet):][:1]
            assert before in ("", " ") and after in ("", " ", "\n")  # never glued to the prose
            assert 0 <= start < end <= len(context_ids)
            assert snippet.rstrip(".").split()[-1] in tok.decode(context_ids[start:end])
        hay = s.context
        for snippet in s.meta["snippets"]:
            hay = hay.replace(snippet, "")
        assert not re.search(r"magic number|VAR [A-Z]{5}| key opens | box holds ", hay)  # nothing else inserted


@pytest.mark.parametrize("task", NEW_TASKS)
def test_many_seeds_fit_and_hold_their_answers(tok, task):
    for s in make_samples(task, tok, length=800, samples=8, seed=5):
        assert 800 - LENGTH_TOLERANCE <= len(ids(tok, s.context)) <= 800
        golds = [g for a in s.answers for g in ((a,) if isinstance(a, str) else a)]
        if task == "cwe":
            assert all(s.context.count(f". {g}\n") + s.context.endswith(f". {g}") == s.meta["common_count"]
                       for g in golds)
        else:
            assert all(s.context.count(g) == (2 if task == "vt" and g != s.answer[-1] else 1) for g in golds)
            assert all(s.context.count(snippet) == 1 for snippet in s.meta["snippets"])
        assert score(task, " ".join(golds), s.answer) == 1.0


def test_multikey_content(made):
    for s in made("multikey"):
        needles = re.findall(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.", s.context)
        assert len(needles) == 4 == len({k for k, _ in needles}) == len({v for _, v in needles})
        found = dict(needles)
        asked = re.search(r"for ([a-z]+-[a-z]+) mentioned", s.question).group(1)
        assert found[asked] == s.answer and s.context.count(s.answer) == 1
        assert all(s.context.count(v) == 1 for v in found.values())
        distractor = next(v for k, v in found.items() if k != asked)
        assert score("multikey", right_answer(s), s.answer) == 1.0
        assert score("multikey", f"It is {distractor}.", s.answer) == 0.0
        assert score("multikey", s.answer[:-1], s.answer) == 0.0


def test_multivalue_content(made):
    for s in made("multivalue"):
        needles = re.findall(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.", s.context)
        assert len(needles) == 4 and {k for k, _ in needles} == {s.meta["key"]} and s.meta["key"] in s.question
        assert isinstance(s.answer, tuple) and sorted(s.answer) == sorted(v for _, v in needles)
        assert len(set(s.answer)) == 4 and all(s.context.count(v) == 1 for v in s.answer)
        assert score("multivalue", right_answer(s), s.answer) == 1.0
        assert score("multivalue", f"{s.answer[2]} and {s.answer[0]}", s.answer) == 0.5
        assert score("multivalue", "1234567", s.answer) == 0.0


def resolve_vt(context: str) -> dict[str, str]:
    """Every variable's value, following the VAR chains in reading order."""
    values: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", context):
        values[name] = values[rhs[4:]] if rhs.startswith("VAR ") else rhs  # KeyError: used before assigned
    return values


def test_vt_content(made):
    for s in made("vt"):
        asked = re.search(r"the value (\d{5})", s.question).group(1)
        values = resolve_vt(s.context)
        assert len(values) == 15 and s.context.count(asked) == 1
        assert {n for n, v in values.items() if v == asked} == set(s.answer) and len(s.answer) == 5
        assert all(s.context.count(f"VAR {n} =") == 1 for n in values)  # each variable assigned exactly once
        assert len(set(values.values())) == 3  # the asked chain and 2 distractor chains
        distractors = [n for n, v in values.items() if v != asked]
        assert score("vt", right_answer(s), s.answer) == 1.0
        assert score("vt", right_answer(s).lower(), s.answer) == 1.0  # case-insensitive
        assert score("vt", " ".join(s.answer[:2]), s.answer) == pytest.approx(0.4)
        assert score("vt", " ".join(distractors), s.answer) == 0.0
        assert score("vt", " ".join([*distractors, *s.answer]), s.answer) == 1.0  # extras are not penalised
        assert score("vt", s.answer[0] + "X", s.answer) == 0.0  # whole words only


def test_cwe_content(made):
    for s in made("cwe", length=3000):
        lines = s.context.split("\n")
        assert all(re.fullmatch(rf"{i}\. [a-z]+", line) for i, line in enumerate(lines, start=1))
        counts = collections.Counter(line.split(". ")[1] for line in lines)
        c, r = s.meta["common_count"], s.meta["rare_max_count"]
        assert len(lines) == s.meta["n_items"] and c >= 3 * r and "10 most common" in s.question
        assert len(s.answer) == 10 and all(counts[w] == c for w in s.answer)
        assert all(n <= r for w, n in counts.items() if w not in s.answer)
        assert {w for w, _ in counts.most_common(10)} == set(s.answer)
        rare = [w for w in counts if w not in s.answer]
        assert score("cwe", right_answer(s), s.answer) == 1.0
        assert score("cwe", " ".join(s.answer[:3] + tuple(rare[:7])), s.answer) == pytest.approx(0.3)
        assert score("cwe", " ".join(rare[:10]), s.answer) == 0.0


def test_multihop_content(made):
    for s in made("multihop"):
        opens = dict(re.findall(r"The ([a-z]+) key opens the ([a-z]+) box\.", s.context))
        holds = dict(re.findall(r"The ([a-z]+) box holds the number (\d{7})\.", s.context))
        assert len(opens) == len(holds) == 4 and set(opens.values()) == set(holds)
        key = re.search(r"the ([a-z]+) key opens", s.question).group(1)
        assert holds[opens[key]] == s.answer and s.context.count(s.answer) == 1
        assert score("multihop", right_answer(s), s.answer) == 1.0
        assert score("multihop", holds[next(b for k, b in opens.items() if k != key)], s.answer) == 0.0


def test_multiturn_content(made):
    for s in made("multiturn"):
        found = dict(re.findall(r"The special magic number for ([a-z]+-[a-z]+) is: (\d{7})\.", s.context))
        assert len(s.questions) == len(s.answers) == len(found) == 4
        assert (s.question, s.answer) == (s.questions[0], s.answers[0])
        asked = [re.search(r"for ([a-z]+-[a-z]+) mentioned", q).group(1) for q in s.questions]
        assert set(asked) == set(found) and [found[k] for k in asked] == list(s.answers)
        assert all(s.context.count(a) == 1 for a in s.answers)
        assert [score("multiturn", f"It is {a}.", a) for a in s.answers] == [1.0] * 4
        assert score("multiturn", s.answers[1], s.answers[0]) == 0.0


def test_sample_defaults_keep_old_construction():
    s = Sample("niah", "ctx", "q?", "42", {})
    assert s.questions == ("q?",) and s.answers == ("42",) and s.metric == "contains"


def test_score_metrics_and_alternatives():
    assert score("contains", "it is Paris.", ("London", "Paris")) == 1.0
    assert score("exact", " Paris\n", "Paris") == 1.0 and score("exact", "Paris.", "Paris") == 0.0
    assert score("exact", "paris", ["Paris", "paris"]) == 1.0
    assert score("recall", "red, BLUE", ["red", "blue", "green", "pink"]) == 0.5
    assert score("recall", "1234567", ["123456"]) == 0.0  # not inside a longer number
    assert score("niah", "1234567", "1234567") == 1.0
    for metric in ("contains", "exact", "recall"):
        assert 0.0 == score(metric, "nothing here", ["x1", "y2"])


@pytest.mark.parametrize("name, hint", [("mutlikey", "multikey"), ("recal", "recall")])
def test_unknown_names(tok, name, hint):
    with pytest.raises(KVFoldError, match=f"did you mean '{hint}'") as err:
        score(name, "x", "x")
    assert "niah" in str(err.value) and "contains" in str(err.value)
    if name == "mutlikey":
        with pytest.raises(KVFoldError, match="did you mean 'multikey'") as err:
            make_samples(name, tok, length=1000, samples=1)
        assert all(t in str(err.value) for t in TASKS)


def test_make_samples_bad_arguments(tok):
    with pytest.raises(KVFoldError, match="samples"):
        make_samples("vt", tok, length=1000, samples=0)
    with pytest.raises(KVFoldError, match="int number of tokens"):
        make_samples("multikey", tok, length=1000.0, samples=1)
    assert [s.meta["depth"] for s in make_samples("niah", tok, length=300, samples=3)] == [0.1, 0.5, 0.9]


@pytest.mark.parametrize("task", NEW_TASKS)
def test_too_short_names_a_minimum_that_works(tok, task):
    with pytest.raises(KVFoldError, match=r"needs length >?=? ?\d+") as err:
        make_samples(task, tok, length=60, samples=1)
    minimum = int(re.search(r"needs length (>|>=) (\d+)", str(err.value)).group(2))
    least = minimum + (">=" not in str(err.value))
    assert make_samples(task, tok, length=least, samples=1)[0].meta["n_tokens"] <= least
    with pytest.raises(KVFoldError):
        make_samples(task, tok, length=least - 1, samples=1)


def test_too_long_names_the_maximum(tok):
    with pytest.raises(KVFoldError, match=r"at most (\d+) tokens") as err:
        make_samples("cwe", tok, length=60_000, samples=1)
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    assert 20_000 < most < 60_000
    with pytest.raises(KVFoldError, match=r"at most (\d+) tokens") as err:
        perplexity_text(tok, 60_000, seed=0)
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    assert len(ids(tok, perplexity_text(tok, most, seed=0))) == most  # the whole pool, no paragraph twice


def test_new_tasks_without_offsets():
    s = make_samples("multikey", WordTokenizer(), length=700, samples=1)[0]
    words = s.context.split()
    assert 700 - LENGTH_TOLERANCE <= len(words) <= 700
    for snippet, (start, end) in zip(s.meta["snippets"], s.meta["token_spans"]):
        assert " ".join(words[start:end]) == snippet


@pytest.mark.parametrize("length", [50, 1000, 5000])
def test_perplexity_text(tok, length):
    text = perplexity_text(tok, length, seed=0)
    assert text == perplexity_text(tok, length, seed=0) != perplexity_text(tok, length, seed=1)
    assert length - PERPLEXITY_TOLERANCE <= len(ids(tok, text)) <= length
    paragraphs = text.split("\n\n")
    pool = set(prose_paragraphs())
    assert len(paragraphs) == len(set(paragraphs)) and all(p in pool for p in paragraphs[:-1])
    assert any(p.startswith(paragraphs[-1]) for p in pool) and not text[-1].isspace()
    with pytest.raises(KVFoldError):
        perplexity_text(tok, 0, seed=0)


GOOD = [
    {"context": "Alice lives in Paris. Bob lives in Rome.", "questions": ["Where does Alice live?"],
     "answers": ["Paris"]},
    {"context": "Red, blue and green.", "questions": ["Which colours?", "First colour?"],
     "answers": [["red", "blue", "green"], ["red", "Red"]], "metric": "recall", "task": "colours"},
]


def write_lines(tmp_path, lines: list[str]):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD[0]), "", json.dumps(GOOD[1])])
    a, b = load_jsonl_tasks(path)
    assert (a.task, a.context, a.question, a.answer, a.metric) == ("jsonl", GOOD[0]["context"],
                                                                   "Where does Alice live?", "Paris", "contains")
    assert a.questions == ("Where does Alice live?",) and a.answers == ("Paris",)
    assert a.meta == {"source": str(path), "line": 1} and b.meta["line"] == 3
    assert (b.task, b.metric, b.questions) == ("colours", "recall", ("Which colours?", "First colour?"))
    assert b.answers == (("red", "blue", "green"), ("red", "Red")) and b.answer == ("red", "blue", "green")
    assert score(b.metric, "Blue and red", b.answer) == pytest.approx(2 / 3)
    assert score(a.metric, "She lives in Paris.", a.answer) == 1.0 and score(a.metric, "Rome", a.answer) == 0.0


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    (json.dumps({"questions": ["q"], "answers": ["a"]}), "missing field 'context'"),
    (json.dumps({"context": "c", "answers": ["a"]}), "missing field 'questions'"),
    (json.dumps({"context": "c", "questions": ["q"]}), "missing field 'answers'"),
    (json.dumps({"context": 3, "questions": ["q"], "answers": ["a"]}), "'context' must be"),
    (json.dumps({"context": "c", "questions": "q", "answers": ["a"]}), "'questions' must be"),
    (json.dumps({"context": "c", "questions": ["q"], "answers": [7]}), "'answers' must be"),
    (json.dumps({"context": "c", "questions": ["q"], "answers": [[]]}), "'answers' must be"),
    (json.dumps({"context": "c", "questions": ["q", "r"], "answers": ["a"]}), "2 questions but 1 answers"),
    (json.dumps({"context": "c", "questions": ["q"], "answers": ["a"], "metric": "f1"}), "unknown metric"),
    (json.dumps({"context": "c", "questions": ["q"], "answers": ["a"], "metirc": "exact"}),
     "did you mean 'metric'"),
    (json.dumps({"context": "c", "questions": ["q"], "answers": ["a"], "task": ""}), "'task' must be"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad, problem):
    # line 2 is bad and line 3 is good: the error is raised, the good line after it is not silently kept
    path = write_lines(tmp_path, [json.dumps(GOOD[0]), bad, json.dumps(GOOD[1])])
    with pytest.raises(KVFoldError, match=re.escape(f"{path}:2: ")) as err:
        load_jsonl_tasks(path)
    assert problem in str(err.value)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_jsonl_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KVFoldError, match="no samples"):
        load_jsonl_tasks(path)
    with pytest.raises(KVFoldError, match="cannot read"):
        load_jsonl_tasks(tmp_path / "missing.jsonl")


def test_ppl_samples_are_seeded_prose_with_an_evaluated_tail(tok, made):
    a, b = made("ppl")
    assert a == make_samples("ppl", tok, length=1200, samples=2, seed=0)[0] and a.context != b.context
    assert a.metric == "perplexity" and a.questions == ("",) and a.meta["eval_tokens"] == 256
    assert make_samples("ppl", tok, length=400, samples=1)[0].meta["eval_tokens"] == 100  # a quarter when short
    assert a.context == perplexity_text(tok, 1200, a.meta["seed"])
