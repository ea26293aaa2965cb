"""expected: RoPE undone and redone exactly; the closed-form expected attention ranks keys like a Monte Carlo
estimate from sampled future queries; runs in a model and keeps the budget."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvfold
from kvfold.errors import KVFoldError
from kvfold.methods.base import ScoreInputs
from kvfold.methods.expected import ExpectedAttention, rope
from kvfold.models import rope_frequencies

from ..tiny_models import FAMILIES, tiny_model
from .helpers import embedded_run, rope_free_inputs, run_spec, uniform_rows


def test_rotation_is_transformers_rope_and_inverts(tiny_llama):
    inv_freq = rope_frequencies(tiny_llama.config)
    torch.testing.assert_close(inv_freq, tiny_llama.model.rotary_emb.inv_freq.float())
    x, positions = torch.randn(1, 2, 5, 16), torch.arange(100, 105)
    cos, sin = tiny_llama.model.rotary_emb(x, positions.unsqueeze(0))
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rope(x, positions, inv_freq), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope(rope(x, positions, inv_freq), -positions, inv_freq), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_matches_monte_carlo_attention_of_future_queries(seed):
    torch.manual_seed(seed)
    dim, window, tokens, future = 32, 128, 200, 64
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    mean, mix = torch.randn(dim) * 1.5, torch.randn(dim, dim) * 0.4
    sample = lambda n: mean + torch.randn(n, dim) @ mix  # pre-RoPE queries  # noqa: E731
    last = 1000
    q_pos = torch.arange(last - window + 1, last + 1)
    queries = rope(sample(window), q_pos, inv_freq).view(1, 1, window, dim)
    k_pos = torch.arange(tokens) * 4
    keys = rope(torch.randn(tokens, dim), k_pos, inv_freq).view(1, 1, tokens, dim)
    values = torch.ones(1, 1, tokens, dim)
    x = ScoreInputs(queries, q_pos, keys, values, k_pos.view(1, 1, -1), torch.ones(1, 1, tokens, dtype=torch.bool),
                    dim**-0.5, inv_freq)
    scores = ExpectedAttention(vnorm=False, future=future).raw_score(x)[0, 0]
    # Monte Carlo: fresh queries from the same distribution at every future position, attention averaged
    f_pos = torch.arange(last + 1, last + 1 + future).repeat_interleave(50)
    empirical = torch.softmax(rope(sample(len(f_pos)), f_pos, inv_freq) @ keys[0, 0].T * dim**-0.5, dim=-1).mean(0)

    def overlap(ranking: torch.Tensor, top: int = 40) -> float:
        return len(set(ranking.topk(top).indices.tolist()) & set(empirical.topk(top).indices.tolist())) / top

    def correlation(ranking: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([ranking.log(), empirical.log()]))[0, 1])

    # the mean and covariance come from `window` samples, so the ranking is close, not exact
    assert overlap(scores) >= 0.7 and correlation(scores) > 0.85
    assert overlap(scores) > overlap(-keys[0, 0].norm(dim=-1)) + 0.2  # far better than key norms
    without_covariance = ExpectedAttention(vnorm=False, future=future, covariance=False).raw_score(x)[0, 0]
    assert correlation(scores) > correlation(without_covariance)


def test_value_norm_weights_the_score():
    torch.manual_seed(1)
    dim, tokens = 16, 30
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    queries, keys = torch.randn(1, 2, 8, dim), torch.randn(1, 1, tokens, dim)
    values = torch.ones(1, 1, tokens, dim)
    values[0, 0, 7] *= 50
    x = ScoreInputs(queries, torch.arange(22, 30), keys, values, torch.arange(tokens).view(1, 1, -1),
                    torch.ones(1, 1, tokens, dtype=torch.bool), 0.25, inv_freq)
    plain, weighted = ExpectedAttention(vnorm=False).raw_score(x), ExpectedAttention().raw_score(x)
    torch.testing.assert_close(weighted[0, 0, 7] / weighted[0, 0, 3], 50 * plain[0, 0, 7] / plain[0, 0, 3])
    assert torch.allclose(plain.sum(-1), torch.ones(1, 1))  # probabilities of the GQA group's mean


def test_runs_in_a_model_and_keeps_the_ratio(tiny_llama):
    torch.manual_seed(0)
    cache = run_spec(tiny_llama, "expected:0.5,window=8", torch.randint(1, 256, (1, 120)), steps=3)
    for layer in cache.layers:
        assert layer.row_lengths().flatten().tolist() == [60 + 3] * 2
    uniform_rows(run_spec(tiny_llama, "expected:0.75,window=4,sink=2", torch.randint(1, 256, (1, 80))), 20)


def test_needs_rope_frequencies_and_valid_knobs():
    x = rope_free_inputs()
    with pytest.raises(KVFoldError, match="RoPE"):
        ExpectedAttention().raw_score(x)
    with pytest.raises(KVFoldError, match="future"):
        kvfold.Compressor.parse("expected:0.5,future=0")
    with pytest.raises(KVFoldError, match="true or false"):
        ExpectedAttention(vnorm=2)


@pytest.mark.slow
def test_embedded_model_generates_with_fewer_bytes(embedded):
    answer, full = embedded_run(*embedded, "expected:0.5")
    assert answer.tokens and answer.kv_bytes < 0.75 * full.kv_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_frequencies_match_every_family_and_layer_type(family):
    model = tiny_model(family)
    for name, buffer in model.model.rotary_emb.named_buffers():
        if name.endswith("inv_freq") and "original" not in name:
            layer_type = name.removesuffix("_inv_freq") if name != "inv_freq" else "full_attention"
            torch.testing.assert_close(rope_frequencies(model.config, layer_type), buffer.float())
    torch.manual_seed(0)
    uniform_rows(run_spec(model, "expected:0.5,window=4", torch.randint(1, 200, (1, 40))), 20)
