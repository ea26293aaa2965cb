"""TriAttention: the trigonometric series is the exact logit of the query centre at each future distance; with no
centre (queries spread evenly in phase) only the norm term remains; runs in a model at prefill and while decoding."""

import math

import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.methods.base import ScoreInputs
from kvfold.methods import expected
from kvfold.methods.triattention import TriAttention, future_offsets

from .helpers import embedded_run, rope_free_inputs, run_spec, uniform_rows

DIM = 16
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, DIM, 2).float() / DIM)


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return expected.rope(x, positions, INV_FREQ)


def _inputs(pre_queries: torch.Tensor, pre_keys: torch.Tensor, key_positions: torch.Tensor, last: int) -> ScoreInputs:
    window, tokens = pre_queries.shape[0], pre_keys.shape[0]
    q_pos = torch.arange(last - window + 1, last + 1)
    return ScoreInputs(rope(pre_queries, q_pos).view(1, 1, window, DIM), q_pos,
                       rope(pre_keys, key_positions).view(1, 1, tokens, DIM), torch.ones(1, 1, tokens, DIM),
                       key_positions.view(1, 1, -1), torch.ones(1, 1, tokens, dtype=torch.bool), DIM**-0.5, INV_FREQ)


def test_offsets_are_powers_of_two_up_to_future():
    assert future_offsets(1).tolist() == [1.0]
    assert future_offsets(100).tolist() == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("future,pool", [(1, "mean"), (64, "mean"), (64, "max")])
def test_series_is_the_centre_query_logit_at_each_future_distance(future, pool):
    torch.manual_seed(0)
    pre_queries = torch.randn(5, DIM) + 2.0  # the centre q̄ is their mean
    pre_keys, positions, last = torch.randn(40, DIM), torch.arange(40) * 3, 300
    scores = TriAttention(future=future, pool=pool, norm=False).raw_score(_inputs(pre_queries, pre_keys, positions, last))
    centre = pre_queries.mean(0)
    logits = torch.stack([rope(centre.view(1, DIM), torch.tensor([last + o])) @ rope(pre_keys, positions).T
                          for o in future_offsets(future).long()])[:, 0]  # [offsets, tokens]: RoPE'd dot products
    expected = logits.mean(0) if pool == "mean" else logits.amax(0)
    torch.testing.assert_close(scores[0, 0].float(), expected, atol=1e-4, rtol=1e-4)


def test_without_a_centre_the_norm_term_ranks_keys():
    """Window queries with the same magnitude per pair and phases evenly spread: q̄ = 0, so the series vanishes and
    the score is Σ_f E|q_f|·|k_f| — by hand, |q_f| = 1 on every pair, the sum of the key's pair magnitudes."""
    window, half = 8, DIM // 2
    phases = 2 * math.pi * torch.arange(window).float() / window
    pre_queries = torch.cat([phases.cos().unsqueeze(1).expand(window, half),
                             phases.sin().unsqueeze(1).expand(window, half)], dim=1)
    torch.manual_seed(1)
    pre_keys = torch.randn(30, DIM)
    pre_keys[7] *= 6
    scores = TriAttention().raw_score(_inputs(pre_queries, pre_keys, torch.arange(30), 100))[0, 0]
    by_hand = torch.complex(pre_keys[:, :half], pre_keys[:, half:]).abs().sum(-1)
    torch.testing.assert_close(scores.float(), by_hand, atol=1e-4, rtol=1e-4)
    assert int(scores.argmax()) == 7
    no_norm = TriAttention(norm=False).raw_score(_inputs(pre_queries, pre_keys, torch.arange(30), 100))
    assert no_norm.abs().max() < 1e-4


def test_gqa_group_mean():
    torch.manual_seed(2)
    x = _inputs(torch.randn(4, DIM) + 1, torch.randn(20, DIM), torch.arange(20), 50)
    doubled = ScoreInputs(torch.cat([x.queries, -x.queries], dim=1), *[getattr(x, f) for f in (
        "query_positions", "keys", "values", "positions", "valid", "scale", "inv_freq")])
    one = TriAttention(norm=False).raw_score(x)
    other = TriAttention(norm=False).raw_score(ScoreInputs(-x.queries, *[getattr(x, f) for f in (
        "query_positions", "keys", "values", "positions", "valid", "scale", "inv_freq")]))
    torch.testing.assert_close(TriAttention(norm=False).raw_score(doubled), (one + other) / 2)


def test_runs_at_prefill_and_while_decoding(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 120))
    cache = run_spec(tiny_llama, "triattention:0.5,window=8", ids, steps=3)
    for layer in cache.layers:
        assert layer.row_lengths().flatten().tolist() == [60 + 3] * 2
    uniform_rows(run_spec(tiny_llama, "triattention:budget=40,window=8,every=4", ids, steps=8), 40)
    assert run_spec(tiny_llama, "triattention:0.5", ids).nbytes() < 0.6 * run_spec(tiny_llama, "none", ids).nbytes()


def test_needs_rope_and_valid_knobs():
    x = rope_free_inputs()
    with pytest.raises(KVFoldError, match="RoPE"):
        TriAttention().raw_score(x)
    with pytest.raises(KVFoldError, match="future"):
        kvfold.Compressor.parse("triattention:0.5,future=0")
    with pytest.raises(KVFoldError, match="pool must be"):
        kvfold.Compressor.parse("triattention:0.5,pool=median")
    assert kvfold.Compressor.parse("triattention:0.5,pool=max@adakv+kivi:4").spec == \
        "triattention:0.5,pool=max@adakv+kivi:4"


@pytest.mark.slow
def test_embedded_model_generates_with_fewer_bytes(embedded):
    answer, full = embedded_run(*embedded, "triattention:0.5")
    assert answer.tokens and answer.kv_bytes < 0.75 * full.kv_bytes
