"""PyramidKV: per-layer counts on a line decreasing with depth (bottom 2s - s/beta, top s/beta of the share s left
after the protected tokens), averaging to the uniform count within rounding (at most 0.5 token per layer), the same
for every head of a layer, clamped to what a row holds and never below one token."""

import pytest
import torch

import kvfold
from kvfold import Compressor, KVFoldError
from kvfold.api import prefill, use_kvfold_attention
from kvfold.methods.base import ScoreInputs, UniformBudget
from kvfold.methods.knorm import KNorm
from kvfold.methods.pyramidkv import PyramidKVBudget

from .helpers import embedded_run, kept, none_bytes, run_spec


def scored(tokens=200, heads=2, window=16, sink=4, ratio=0.6, invalid=0):
    """Real scores (protected tokens at the base's boost), the uniform keep count, and the protected span."""
    g = torch.Generator().manual_seed(tokens + heads)
    keys = torch.randn(1, heads, tokens, 8, generator=g)
    valid = torch.ones(1, heads, tokens, dtype=torch.bool)
    valid[..., :invalid] = False
    x = ScoreInputs(torch.randn(1, 2 * heads, 1, 8), torch.tensor([tokens - 1]), keys, keys,
                    torch.arange(tokens).expand(1, heads, tokens), valid, 8 ** -0.5)
    scorer = KNorm(ratio=ratio, window=window, sink=sink)
    return scorer.score(x), scorer.keep_count(valid[:, 0].sum(-1)), window + sink


def layer_counts(budget, scores, keep, layers):
    counts = []
    for layer in range(layers):
        mask = budget.select(scores, keep, layer, layers)
        per_head = mask.sum(-1)[0]
        assert (per_head == per_head[0]).all(), "the heads of a layer keep the same number"
        assert not (mask & ~torch.isfinite(scores)).any(), "an invalid slot was kept"
        assert mask[..., -16:].all(), "a protected token was dropped"
        counts.append(int(per_head[0]))
    return counts


@pytest.mark.parametrize("layers", [2, 3, 8, 30])
@pytest.mark.parametrize("beta", [1.5, 5, 20])
def test_counts_decrease_with_depth_and_average_to_the_uniform_count(layers, beta):
    scores, keep, protected = scored(ratio=0.6)
    counts = layer_counts(PyramidKVBudget(beta=beta), scores, keep, layers)
    uniform = int(keep[0])  # ceil(0.4 * 200) = 80
    share = uniform - protected
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert min(counts) >= protected
    assert counts[0] == protected + round(2 * share - share / beta) and counts[-1] == protected + round(share / beta)
    assert abs(sum(counts) - layers * uniform) <= layers / 2, (counts, uniform)  # rounding: <= 0.5 token per layer


def test_beta_one_is_uniform_and_one_layer_is_uniform():
    scores, keep, _ = scored()
    uniform = UniformBudget().select(scores, keep)
    for layer in range(4):
        assert torch.equal(PyramidKVBudget(beta=1).select(scores, keep, layer, 4), uniform)
    assert torch.equal(PyramidKVBudget().select(scores, keep, 0, 1), uniform)


def test_kept_tokens_are_the_top_scores_of_each_head():
    scores, keep, _ = scored()
    budget = PyramidKVBudget()
    for layer in range(3):
        mask = budget.select(scores, keep, layer, 3)
        for head in range(2):
            n = int(mask[0, head].sum())
            assert set(torch.nonzero(mask[0, head]).flatten().tolist()) == set(scores[0, head].topk(n).indices.tolist())


def test_a_layer_keeps_at_most_what_it_holds():
    """ratio 0.2: the bottom's share would exceed the tokens; those layers keep all, the total stays under uniform."""
    scores, keep, _ = scored(ratio=0.2, invalid=10)  # 190 valid tokens, keep 152
    counts = layer_counts(PyramidKVBudget(), scores, keep, 6)
    assert counts[0] == 190 and all(c <= 190 for c in counts)
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(counts) <= 6 * int(keep[0])


def test_never_below_one_token():
    scores, keep, protected = scored(window=0, sink=0, ratio=0.98)  # nothing protected, a share of 5 tokens
    share = int(keep[0])
    counts = [int(PyramidKVBudget().select(scores, keep, layer, 10).sum(-1)[0, 0]) for layer in range(10)]
    assert protected == 0 and share == 5
    assert counts[0] == round(2 * share - share / 20) and counts[-1] == 1  # round(5 / 20) = 0 -> one token


def test_spec_forms():
    assert Compressor.parse("pyramidkv:0.75") == Compressor.parse("snapkv:0.75@pyramidkv")
    compressor = Compressor.parse("pyramidkv:0.75,beta=5")
    assert compressor.scorer.name == "snapkv" and compressor.budget == PyramidKVBudget(beta=5)
    assert compressor.spec == "snapkv:0.75@pyramidkv:beta=5"
    assert Compressor.parse(compressor.spec) == compressor
    assert Compressor.parse("knorm:0.5@pyramidkv:beta=2.5").budget.beta == 2.5


@pytest.mark.parametrize("spec", ["pyramidkv:0.5,beta=0.5", "snapkv:0.5@pyramidkv:beta=0", "pyramidkv:0.5,beta=inf",
                                  "pyramidkv:0.5,beta=true", "pyramidkv:0.5,beta=steep"])
def test_bad_beta_is_a_clear_error(spec):
    with pytest.raises(KVFoldError, match=r"pyramidkv: beta must be a number >= 1"):
        Compressor.parse(spec)


# tiny_llama: 3 layers, 2 KV heads. 300 tokens at ratio 0.5 keep 150 per row; window 32 leaves a share of 118:
# bottom 32 + round(236 - 5.9) = 262, middle 32 + 118 = 150, top 32 + round(5.9) = 38 (mean 150).
PYRAMID_300 = [262, 150, 38]


@pytest.mark.parametrize("spec", ["snapkv:0.5@pyramidkv", "h2o:0.5@pyramidkv+kivi:4"])
def test_prefill_then_decode_on_tiny_llama(tiny_llama, spec):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(31))
    cache = run_spec(tiny_llama, spec, ids, steps=4)
    rows = [layer.row_lengths().flatten().tolist() for layer in cache.layers]
    assert rows == [[n + 4, n + 4] for n in PYRAMID_300]
    assert [[len(p) for p in layer] for layer in kept(cache)] == rows
    assert cache.stored_tokens() == 2 * sum(n + 4 for n in PYRAMID_300)
    assert cache.nbytes() < none_bytes(tiny_llama, ids, steps=4)


def test_same_scores_as_the_uniform_budget_only_the_counts_move(tiny_llama):
    """Prefill attention is exact whatever is evicted, so each layer scores as under `uniform`: the middle layer
    (the uniform count) keeps the same tokens, the bottom a superset, the top a subset."""
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(32))
    pyramid = kept(run_spec(tiny_llama, "snapkv:0.5@pyramidkv", ids))
    uniform = kept(run_spec(tiny_llama, "snapkv:0.5", ids))
    for head in range(2):
        bottom, middle, top = (set(layer[head].tolist()) for layer in pyramid)
        assert middle == set(uniform[1][head].tolist())
        assert bottom >= set(uniform[0][head].tolist()) and top <= set(uniform[2][head].tolist())


def test_chunked_prefill_ends_with_the_one_pass_counts(tiny_llama):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(33))
    with torch.no_grad(), use_kvfold_attention(tiny_llama):
        cache = kvfold.make_cache(tiny_llama, "snapkv:0.75@pyramidkv")
        prefill(tiny_llama, cache, ids, chunk=64)
    # keep 75, share 43: 32 + round(86 - 2.15) = 116, 32 + 43 = 75, 32 + round(2.15) = 34
    assert [layer.row_lengths().flatten().tolist() for layer in cache.layers] == [[116] * 2, [75] * 2, [34] * 2]


def test_decode_time_recompression_keeps_the_pyramid(tiny_llama):
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(34))
    cache = run_spec(tiny_llama, "snapkv:0.5,window=8,every=8@pyramidkv", ids, steps=8)
    # seen 208 at the last step, a multiple of 8: keep 104, share 96 -> 8 + round(192 - 4.8), 8 + 96, 8 + round(4.8)
    assert [layer.row_lengths().flatten().tolist() for layer in cache.layers] == [[195] * 2, [104] * 2, [13] * 2]


@pytest.mark.slow
def test_embedded_model_generates_with_fewer_bytes(embedded):
    answer, full = embedded_run(*embedded, "pyramidkv:0.5")
    assert answer.tokens and answer.kv_bytes < 0.75 * full.kv_bytes
