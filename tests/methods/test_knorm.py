"""K-norm keeps exactly the smallest-L2-norm keys of each KV head (outside the protected span), whatever the query."""

import pytest
import torch

from kvfold import Compressor
from kvfold.methods.base import ScoreInputs, UniformBudget
from kvfold.methods.knorm import KNorm

from .helpers import ceil_half, embedded_run, kept, none_bytes, run_spec, uniform_rows


def inputs_with_norms(norms: torch.Tensor, queries: torch.Tensor | None = None) -> ScoreInputs:
    """Keys [1, heads, tokens, 8] whose L2 norms are `norms` [heads, tokens], in random directions."""
    heads, tokens = norms.shape
    torch.manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1, heads, tokens, 8), dim=-1) * norms.view(1, heads, tokens, 1)
    queries = torch.randn(1, 2 * heads, 4, 8) if queries is None else queries
    positions = torch.arange(tokens).expand(1, heads, tokens)
    return ScoreInputs(queries, torch.arange(tokens - 4, tokens), keys, torch.randn_like(keys), positions,
                       torch.ones(1, heads, tokens, dtype=torch.bool), 8 ** -0.5)


def test_keeps_exactly_the_smallest_norm_keys_outside_the_protected_span():
    norms = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(s)).float() + 1 for s in (1, 2)])
    x = inputs_with_norms(norms)
    scorer = KNorm(ratio=0.5, window=4, sink=2)
    keep = scorer.keep_count(torch.tensor([40]))
    assert keep.tolist() == [20]
    mask = UniformBudget().select(scorer.score(x), keep)
    for head in range(2):
        protected = {0, 1, 36, 37, 38, 39}
        middle = torch.arange(2, 36)
        smallest = middle[norms[head, 2:36].argsort()[:20 - len(protected)]]
        assert set(torch.nonzero(mask[0, head]).flatten().tolist()) == protected | set(smallest.tolist())


def test_score_is_minus_the_norm_and_ignores_the_queries():
    norms = torch.rand(2, 30) * 5 + 0.1
    a, b = inputs_with_norms(norms), inputs_with_norms(norms, queries=torch.randn(1, 4, 4, 8) * 100)
    torch.testing.assert_close(KNorm().raw_score(a), -norms.unsqueeze(0))
    torch.testing.assert_close(KNorm().raw_score(a), KNorm().raw_score(b))
    assert not Compressor.parse("knorm:0.5").query_aware


def test_kept_positions_are_the_smallest_norm_keys_of_each_layer(tiny_llama):
    """Independent reference: the keys (RoPE applied) of a plain transformers cache, ranked by norm."""
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = tiny_llama(ids, use_cache=True).past_key_values
    cache = run_spec(tiny_llama, "knorm:0.6,window=16", ids)
    for layer, got in zip(reference.layers, kept(cache)):
        score = -layer.keys[0].float().norm(dim=-1)
        score[:, -16:] = float("inf")
        want = score.topk(80, dim=-1).indices.sort(dim=-1).values  # ceil(0.4 * 200) = 80
        assert torch.equal(torch.stack(got), want)


def test_prefill_then_decode_on_tiny_llama(tiny_llama):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(6))
    cache = run_spec(tiny_llama, "knorm:0.5", ids, steps=4)
    uniform_rows(cache, 150 + 4)  # ceil(0.5 * 300) at prefill, then every decoded token is stored
    for layer in kept(cache):
        for positions in layer:  # the protected window and the decoded tokens are all there
            assert set(range(300 - 32, 304)) <= set(positions.tolist())
    assert cache.nbytes() < none_bytes(tiny_llama, ids, steps=4)


def test_decode_time_compression_every_8(tiny_llama):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(7))
    cache = run_spec(tiny_llama, "knorm:0.5,every=8", ids, steps=16)
    # seen 316; the last re-compression ran at 312 (ceil(0.5 * 312) = 156), then 4 more tokens were stored
    uniform_rows(cache, ceil_half(312) + 4)
    assert cache.nbytes() < none_bytes(tiny_llama, ids, steps=16)


@pytest.mark.slow
def test_embedded_model_generates_with_fewer_bytes(embedded):
    answer, full = embedded_run(*embedded, "knorm:0.5")
    assert answer.tokens and answer.kv_bytes < 0.75 * full.kv_bytes
