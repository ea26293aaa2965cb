"""H2O scores a key by the causal attention it accumulated from every prompt query (mean over the GQA group), in
query chunks that never hold the whole attention matrix, and keeps the heavy hitters plus the recent window."""

import pytest
import torch

from kvfold import Compressor
from kvfold.methods.base import ScoreInputs
from kvfold.methods.h2o import H2O, accumulated_attention
from kvfold.methods.base import window_attention

from .helpers import eager_attentions, embedded_run, kept, none_bytes, run_spec, uniform_rows


def prompt_inputs(tokens=23, q_heads=6, kv_heads=2, dim=8, seed=0, valid=None) -> ScoreInputs:
    """Every prompt query over every prompt key, as the cache passes them at prefill (`observes_all`)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, tokens, dim, generator=g)
    queries = torch.randn(1, q_heads, tokens, dim, generator=g) * 2
    valid = torch.ones(1, kv_heads, tokens, dtype=torch.bool) if valid is None else valid
    return ScoreInputs(queries, torch.arange(tokens), keys, torch.randn_like(keys),
                       torch.arange(tokens).expand(1, kv_heads, tokens), valid, dim ** -0.5)


def dense_reference(x: ScoreInputs) -> torch.Tensor:
    """Full [q_heads, n, n] causal softmax (triangular mask), summed over queries, averaged over each group."""
    _, q_heads, n, _ = x.queries.shape
    kv_heads = x.keys.shape[1]
    keys = x.keys.repeat_interleave(q_heads // kv_heads, dim=1)
    logits = x.queries @ keys.transpose(-1, -2) * x.scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return attn.sum(dim=2).view(1, kv_heads, q_heads // kv_heads, n).mean(dim=2)


@pytest.mark.parametrize("chunk", [1, 5, 23, 256])
def test_chunked_accumulation_equals_the_dense_attention_sum(chunk):
    x = prompt_inputs()
    torch.testing.assert_close(accumulated_attention(x, chunk=chunk), dense_reference(x))
    # each query's row sums to one, so the scores of a group sum to the number of queries
    torch.testing.assert_close(accumulated_attention(x, chunk=chunk).sum(-1), torch.full((1, 2), 23.0))


def test_equals_snapkv_window_attention_summed_when_the_window_covers_every_query():
    x = prompt_inputs(tokens=17, q_heads=4, kv_heads=2, seed=3)
    attn = window_attention(x)  # [1, q_heads, 17, 17]
    expected = attn.view(1, 2, 2, 17, 17).mean(dim=2).sum(dim=2)
    torch.testing.assert_close(H2O().raw_score(x), expected)


def test_invalid_keys_get_no_attention_and_padded_queries_give_none():
    valid = torch.ones(1, 2, 23, dtype=torch.bool)
    valid[..., :5] = False  # left padding
    x = prompt_inputs(valid=valid)
    scores = accumulated_attention(x, chunk=4)
    assert (scores[..., :5] == 0).all()
    torch.testing.assert_close(scores.sum(-1), torch.full((1, 2), 18.0))  # only the 18 real queries vote


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_stored_keys_out_of_order_or_past_every_query_match_window_attention(chunk):
    """A chunked prefill's store: rows of different validity, keys not in position order, keys newer than every
    query (each chunk reads only the slots some query can see; the result must not depend on that)."""
    g = torch.Generator().manual_seed(4)
    batch, kv_heads, tokens, dim = 2, 2, 30, 8
    keys = torch.randn(batch, kv_heads, tokens, dim, generator=g)
    positions = torch.stack([torch.randperm(40, generator=g)[:tokens] for _ in range(batch * kv_heads)])
    valid = torch.rand(batch, kv_heads, tokens, generator=g) < 0.8
    queries = torch.randn(batch, 4, 12, dim, generator=g)
    x = ScoreInputs(queries, torch.arange(3, 27, 2), keys, keys, positions.view(batch, kv_heads, tokens), valid,
                    dim ** -0.5)
    expected = window_attention(x).view(batch, kv_heads, 2, 12, tokens).sum(dim=3).mean(dim=2)
    torch.testing.assert_close(accumulated_attention(x, chunk=chunk), expected)


def test_kept_indices_equal_an_independent_top_k_of_eager_attention(tiny_llama):
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(12))
    cache = run_spec(tiny_llama, "h2o:0.6,window=16", ids)
    for layer, (attn, got) in enumerate(zip(eager_attentions(tiny_llama, ids), kept(cache))):
        votes = attn[0].float().sum(dim=1).view(2, 2, 200).mean(dim=1)  # [kv_heads, tokens]
        votes[:, -16:] = float("inf")
        want = votes.topk(80, dim=-1).indices.sort(dim=-1).values  # ceil(0.4 * 200) = 80
        assert torch.equal(torch.stack(got), want), f"layer {layer}"


def test_prefill_then_decode_on_tiny_llama(tiny_llama):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(13))
    cache = run_spec(tiny_llama, "h2o:0.5", ids, steps=4)
    uniform_rows(cache, 150 + 4)
    assert cache.nbytes() < none_bytes(tiny_llama, ids, steps=4)


def test_decode_time_rescoring_keeps_the_budget(tiny_llama):
    ids = torch.randint(1, 256, (1, 100), generator=torch.Generator().manual_seed(14))
    cache = run_spec(tiny_llama, "h2o:0.5,window=8,every=4", ids, steps=8)
    uniform_rows(cache, 54)  # the 8th step brings `seen` to 108, a multiple of 4: back to ceil(0.5 * 108)


def test_observes_every_prompt_query_and_is_query_aware():
    assert H2O.observes_all and Compressor.parse("h2o:0.5").query_aware


@pytest.mark.slow
def test_embedded_model_generates_with_fewer_bytes(embedded):
    answer, full = embedded_run(*embedded, "h2o:0.5")
    assert answer.tokens and answer.kv_bytes < 0.75 * full.kv_bytes
