"""merge (LOOK-M): the arithmetic equals a direct loop; selection and bytes stay the eviction method's; only
contents change; bad compositions are errors."""

import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.methods.merge import Merge

from .helpers import kept, run_spec


def merge_by_loop(keys, values, keep, valid, strategy):
    """The definition, one token at a time."""
    keys, values = keys.clone(), values.clone()
    out_k, out_v = keys.clone(), values.clone()
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            kept_ids = torch.nonzero(keep[b, h]).flatten().tolist()
            sums = {i: (keys[b, h, i].clone(), values[b, h, i].clone(), 1.0) for i in kept_ids}
            for e in torch.nonzero(valid[b, h] & ~keep[b, h]).flatten().tolist():
                sims = {i: float(torch.cosine_similarity(keys[b, h, e], keys[b, h, i], dim=0)) for i in kept_ids}
                best = max(sims, key=sims.get)
                w = 1.0 if strategy == "average" else max(sims[best], 0.0)
                k, v, total = sums[best]
                sums[best] = (k + w * keys[b, h, e], v + w * values[b, h, e], total + w)
            for i, (k, v, total) in sums.items():
                out_k[b, h, i], out_v[b, h, i] = k / total, v / total
    return out_k, out_v


@pytest.mark.parametrize("strategy", ["average", "weighted"])
def test_merge_equals_the_loop(strategy):
    torch.manual_seed(0)
    keys, values = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    keep = torch.rand(2, 3, 40) < 0.4
    valid = torch.ones(2, 3, 40, dtype=torch.bool)
    valid[1, :, :5] = False  # padding gives nothing
    keep &= valid
    got = Merge(strategy).merge(keys, values, keep, valid)
    expected = merge_by_loop(keys, values, keep, valid, strategy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0][~keep], keys[~keep])  # evicted and padding slots untouched (and then dropped)


def test_an_evicted_duplicate_averages_into_its_twin():
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 0.1]]]])
    values = torch.tensor([[[[1.0, 1.0], [5.0, 5.0], [3.0, 3.0]]]])
    keep = torch.tensor([[[True, True, False]]])
    k, v = Merge().merge(keys, values, keep, torch.ones_like(keep))
    torch.testing.assert_close(k[0, 0, 0], torch.tensor([1.5, 0.05]))
    torch.testing.assert_close(v[0, 0, 0], torch.tensor([2.0, 2.0]))
    assert torch.equal(k[0, 0, 1], keys[0, 0, 1]) and torch.equal(v[0, 0, 1], values[0, 0, 1])


def test_selection_and_bytes_are_the_scorers_and_contents_change(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 150))
    plain = run_spec(tiny_llama, "snapkv:0.5", ids, steps=2)
    merged = run_spec(tiny_llama, "snapkv:0.5+merge", ids, steps=2)
    as_lists = lambda cache: [[p.tolist() for p in layer] for layer in kept(cache)]  # noqa: E731
    assert as_lists(plain) == as_lists(merged) and plain.nbytes() == merged.nbytes()
    a = next(plain.layers[0].chunks()).keys
    b = next(merged.layers[0].chunks()).keys
    assert not torch.allclose(a, b)


def test_merge_with_chunked_prefill_and_a_quantizer(tiny_llama):
    torch.manual_seed(1)
    ids = torch.randint(1, 256, (1, 300))
    with torch.no_grad(), kvfold.api.use_kvfold_attention(tiny_llama):
        cache = kvfold.make_cache(tiny_llama, "snapkv:0.5+merge:weighted+kivi:4,group=16,residual=16")
        kvfold.api.prefill(tiny_llama, cache, ids, chunk=64)
    assert cache.stored_tokens() == 3 * 2 * 150


def test_bad_compositions_name_the_fix():
    with pytest.raises(KVFoldError, match="add an eviction method"):
        kvfold.Compressor.parse("merge")
    with pytest.raises(KVFoldError, match="strategy must be"):
        kvfold.Compressor.parse("snapkv:0.5+merge:median")
    with pytest.raises(KVFoldError, match="at most one merge"):
        kvfold.Compressor.parse("snapkv:0.5+merge+merge:weighted")
    assert kvfold.Compressor.parse("snapkv:0.5+merge:weighted+kivi:2").spec == "snapkv:0.5+merge:weighted+kivi:2"
