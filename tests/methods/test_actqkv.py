"""ActQKV: the activation bias weights the window's outlier tokens by hand-computed amounts; the probe query they
build retrieves the key an average of the queries misses; scores are cosines (norm-free) and, before RoPE, the same
for the same key at any position; runs in a model."""

import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.methods.actqkv import ActQKV, activation_weights
from kvfold.methods.base import ScoreInputs
from kvfold.methods.expected import rope

from .helpers import embedded_run, run_spec, uniform_rows

DIM = 8
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, DIM, 2).float() / DIM)


def _inputs(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor | None = None,
            inv_freq: torch.Tensor | None = None) -> ScoreInputs:
    window, tokens = queries.shape[2], keys.shape[2]
    positions = torch.arange(tokens) if positions is None else positions
    return ScoreInputs(queries, torch.arange(1000, 1000 + window), keys, torch.ones_like(keys),
                       positions.view(1, 1, -1), torch.ones(1, 1, tokens, dtype=torch.bool), DIM**-0.5, inv_freq)


def test_activation_bias_by_hand():
    # one head, one channel, values 0, 0, 3: mean 1, variance 2, floor 2/100 -> biases 1, 1, 4 over 2.02
    weights = activation_weights(torch.tensor([0.0, 0.0, 3.0]).view(1, 1, 3, 1))
    torch.testing.assert_close(weights, torch.tensor([[1 / 6, 1 / 6, 4 / 6]]))
    assert torch.allclose(activation_weights(torch.ones(2, 3, 5, 4)), torch.full((2, 5), 0.2))  # no bias: even


def test_probe_retrieves_the_key_the_mean_query_misses():
    common, rare = torch.zeros(DIM), torch.zeros(DIM)
    common[0], rare[1] = 1.0, 1.0
    queries = (common.repeat(9, 1) + 0.05 * torch.randn(9, DIM, generator=torch.Generator().manual_seed(0)))
    queries = torch.cat([queries, (3 * rare + 0.5 * common).view(1, DIM)]).view(1, 1, 10, DIM)  # token 9 stands out
    keys = torch.stack([common, rare, -common, torch.ones(DIM) / DIM**0.5]).view(1, 1, 4, DIM)
    scores = ActQKV(prerope=False).raw_score(_inputs(queries, keys))[0, 0]
    assert int(scores.argmax()) == 1  # the rare direction the outlier token asks about
    mean_query = torch.nn.functional.normalize(queries[0, 0].mean(0), dim=0)
    plain = torch.nn.functional.normalize(keys[0, 0], dim=-1) @ mean_query
    assert int(plain.argmax()) == 0  # an unweighted probe would pick the common direction
    probe = ActQKV(prerope=False).probe(_inputs(queries, keys))[0, 0]
    torch.testing.assert_close(scores, torch.nn.functional.normalize(keys[0, 0], dim=-1)
                               @ torch.nn.functional.normalize(probe, dim=0))


def test_scores_are_cosines_and_prerope_ignores_position():
    torch.manual_seed(1)
    queries, pre_key = torch.randn(1, 2, 6, DIM), torch.randn(DIM)
    positions = torch.tensor([3, 40, 500])
    keys = rope(pre_key.expand(3, DIM), positions, INV_FREQ)
    keys = (keys * torch.tensor([[1.0], [5.0], [0.2]])).view(1, 1, 3, DIM)  # norms differ too
    scores = ActQKV().raw_score(_inputs(queries, keys, positions, INV_FREQ))[0, 0]
    torch.testing.assert_close(scores, scores[0].expand(3), atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1 + 1e-6
    post = ActQKV(prerope=False).raw_score(_inputs(queries, keys, positions, INV_FREQ))[0, 0]
    assert (post - post[0]).abs().max() > 1e-3  # after RoPE the same key differs by position


def test_runs_in_a_model(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 120))
    cache = run_spec(tiny_llama, "actqkv:0.5,window=8", ids, steps=3)
    for layer in cache.layers:
        assert layer.row_lengths().flatten().tolist() == [60 + 3] * 2
    uniform_rows(run_spec(tiny_llama, "actqkv:budget=30,window=8,every=4", ids, steps=8), 30)
    assert kvfold.Compressor.parse("actqkv:0.75,prerope=false@adakv+kivi:2").spec == \
        "actqkv:0.75,prerope=False@adakv+kivi:2"
    with pytest.raises(KVFoldError, match="prerope must be"):
        ActQKV(prerope=3)


@pytest.mark.slow
def test_embedded_model_generates_with_fewer_bytes(embedded):
    answer, full = embedded_run(*embedded, "actqkv:0.5")
    assert answer.tokens and answer.kv_bytes < 0.75 * full.kv_bytes
