"""ChunkKV: spans of `chunk` positions share one score, so budgets keep or drop them whole; the knob works on every
scorer and a bare `snapkv:chunk=8` expands over a sweep's ratios."""

import pytest
import torch

from kvfold import Compressor
from kvfold.demo import expand_specs
from kvfold.errors import KVFoldError
from kvfold.methods.base import ScoreInputs, UniformBudget, chunk_mean
from kvfold.methods.chunkkv import ChunkKV

from .helpers import kept, run_spec


def test_chunk_mean_by_hand_with_gaps_and_padding():
    scores = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]], dtype=torch.float64)
    positions = torch.tensor([[[0, 1, 2, 3, 9, 10, 0]]])  # positions 4..8 already evicted; the last slot is padding
    valid = torch.tensor([[[True] * 6 + [False]]])
    got = chunk_mean(scores, positions, valid, chunk=4)
    # spans: [0, 4) holds 1..4 -> 2.5; [8, 12) holds 5, 6 -> 5.5; padding untouched
    assert got.tolist() == [[[2.5, 2.5, 2.5, 2.5, 5.5, 5.5, 7.0]]]
    assert got[valid].sum() == scores[valid].sum()  # attention mass stays mass


def test_chunks_are_relative_to_absolute_positions_per_row():
    scores = torch.arange(12, dtype=torch.float64).view(2, 1, 6)
    positions = torch.tensor([[[0, 1, 2, 3, 4, 5]], [[100, 101, 102, 103, 104, 105]]])
    got = chunk_mean(scores, positions, torch.ones(2, 1, 6, dtype=torch.bool), chunk=3)
    # row 1 starts at position 100 = 33 * 3 + 1: spans [99, 102) and [102, 105) and [105, 108)
    assert got.tolist() == [[[1.0, 1.0, 1.0, 4.0, 4.0, 4.0]], [[6.5, 6.5, 9.0, 9.0, 9.0, 11.0]]]


def _inputs(tokens: int, hot: int) -> ScoreInputs:
    """One KV head whose single window query attends almost only to key `hot`."""
    keys = torch.zeros(1, 1, tokens, 4)
    keys[0, 0, hot] = torch.tensor([8.0, 0, 0, 0])
    query = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4)
    positions = torch.arange(tokens).view(1, 1, tokens)
    return ScoreInputs(query, torch.tensor([tokens - 1]), keys, keys.clone(), positions,
                       torch.ones(1, 1, tokens, dtype=torch.bool), 1.0)


def test_a_hot_token_brings_its_whole_chunk_and_token_level_does_not():
    x = _inputs(40, hot=21)
    keep = torch.tensor([12])  # window 2 + 10
    chunked = ChunkKV(ratio=0.7, window=2, kernel=1, chunk=10)
    plain = ChunkKV(ratio=0.7, window=2, kernel=1, chunk=0)
    got = set(torch.nonzero(UniformBudget().select(chunked.score(x), keep)[0, 0]).flatten().tolist())
    assert got == {38, 39} | set(range(20, 30))
    alone = set(torch.nonzero(UniformBudget().select(plain.score(x), keep)[0, 0]).flatten().tolist())
    assert 21 in alone and not set(range(20, 30)) <= alone


def test_every_kept_row_is_whole_chunks_but_one_on_tiny_llama(tiny_llama):
    ids = torch.randint(1, 256, (1, 240), generator=torch.Generator().manual_seed(3))
    cache = run_spec(tiny_llama, "chunkkv:0.5,window=16,chunk=8", ids)
    snap = run_spec(tiny_llama, "snapkv:0.5,window=16", ids)
    assert cache.stored_tokens() == snap.stored_tokens()
    for layer in kept(cache):
        for positions in layer:
            middle = positions[positions < 240 - 16]
            counts = torch.bincount(middle // 8, minlength=30)
            assert int(((counts > 0) & (counts < 8)).sum()) <= 1, "at most the budget's last chunk is cut"


def test_knob_on_any_scorer_and_specs():
    assert Compressor.parse("chunkkv:0.5").spec == "chunkkv:0.5"
    assert Compressor.parse("knorm:0.5,chunk=8").scorer.chunk == 8
    assert Compressor.parse("h2o:0.5,chunk=4@adakv+kivi:4").spec == "h2o:0.5,chunk=4@adakv+kivi:4"
    with pytest.raises(KVFoldError, match="chunk must be an integer >= 0"):
        Compressor.parse("snapkv:0.5,chunk=-1")
    specs = [c.spec for c in expand_specs(["snapkv:chunk=8@adakv", "chunkkv", "snapkv:0.3,chunk=8"], [0.5, 0.75])]
    assert specs == ["snapkv:0.5,chunk=8@adakv", "snapkv:0.75,chunk=8@adakv", "chunkkv:0.5", "chunkkv:0.75",
                     "snapkv:0.3,chunk=8"]
