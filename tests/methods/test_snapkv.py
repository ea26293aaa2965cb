"""SnapKV keeps exactly the independent top-k of the window's eager attention, per layer and KV head."""

import pytest
import torch
import torch.nn.functional as F

import kvfold
from kvfold.api import use_kvfold_attention

from .helpers import eager_attentions


def independent_snapkv(attentions, kv_heads, keep, window, kernel):
    """From eager attention maps [batch, q_heads, L, L]: the positions SnapKV must keep, per KV head."""
    expected = []
    for attn in attentions:
        batch, q_heads, length, _ = attn.shape
        votes = attn[:, :, -window:, :].float().reshape(batch, kv_heads, q_heads // kv_heads, window, length)
        votes = votes.mean(dim=(2, 3))
        votes = F.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        votes[..., -window:] = float("inf")
        top = votes[0].topk(keep, dim=-1).indices.sort(dim=-1).values
        expected.append(top)
    return expected


def kept_by_kvfold(model, ids, spec):
    with torch.no_grad(), use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        model(ids, past_key_values=cache)
    return [torch.stack([p.long() for p in layer.kept_positions()[0]]) for layer in cache.layers]


def test_kept_indices_equal_an_independent_top_k(tiny_llama):
    torch.manual_seed(11)
    ids = torch.randint(1, 256, (1, 200))
    kept = kept_by_kvfold(tiny_llama, ids, "snapkv:0.6,window=16,kernel=7")
    expected = independent_snapkv(eager_attentions(tiny_llama, ids), 2, keep=80, window=16, kernel=7)
    for layer, (got, want) in enumerate(zip(kept, expected)):
        assert torch.equal(got, want), f"layer {layer}"


@pytest.mark.slow
def test_kept_indices_on_the_embedded_model(embedded):
    model, tokenizer = embedded
    from kvfold.bench.tasks import needle_sample

    sample = needle_sample(tokenizer, length=1024, depth=0.5, seed=3)
    head, tail = kvfold.split_prompt(tokenizer, sample.context, sample.question)
    ids = torch.tensor([head + tail])
    kept = kept_by_kvfold(model, ids, "snapkv:0.5")
    keep = -(-ids.shape[1] // 2)
    expected = independent_snapkv(eager_attentions(model, ids), model.config.num_key_value_heads, keep, 32, 7)
    mismatched = sum(int((got != want).any()) for got, want in zip(kept, expected))
    assert mismatched == 0, f"{mismatched} of {len(kept)} layers keep other tokens than the eager top-k"
