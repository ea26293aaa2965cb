"""StreamingLLM keeps exactly the sinks and the newest tokens, at prefill and while decoding."""

import torch

import kvfold
from kvfold.api import use_kvfold_attention


def prefill_positions(model, spec, tokens=300):
    torch.manual_seed(0)
    with torch.no_grad(), use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        model(torch.randint(1, 256, (1, tokens)), past_key_values=cache)
    return cache, [p for layer in cache.layers for p in layer.kept_positions()[0]]


def test_ratio_keeps_sinks_and_the_newest_tokens(tiny_llama):
    _, kept = prefill_positions(tiny_llama, "streaming:0.75,sink=4")
    expected = torch.cat([torch.arange(4), torch.arange(300 - 71, 300)])  # ceil(0.25 * 300) = 75 tokens
    assert all(torch.equal(p.long(), expected) for p in kept)


def test_fixed_window(tiny_llama):
    _, kept = prefill_positions(tiny_llama, "streaming:sink=2,window=20")
    expected = torch.cat([torch.arange(2), torch.arange(280, 300)])
    assert all(torch.equal(p.long(), expected) for p in kept)


def test_decode_time_window_slides(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 50))
    with kvfold.compress(tiny_llama, "streaming:sink=4,window=16,every=1") as session:
        tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                            pad_token_id=0)
    seen = 50 + 29
    expected = torch.cat([torch.arange(4), torch.arange(seen - 16, seen)])
    for layer in session.cache.layers:
        assert all(torch.equal(p.long(), expected) for p in layer.kept_positions()[0])


def test_is_not_query_aware():
    assert not kvfold.Compressor.parse("streaming:0.5").query_aware
