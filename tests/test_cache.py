"""The cache and attention path on a tiny random Llama: exactness of `none`, exact byte accounting, forks."""

import math

import pytest
import torch
from transformers import DynamicCache

import kvfold
from kvfold.api import use_kvfold_attention

GEN = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)


def padded_batch(seed=1, length=100, pads=(0, 13)):
    torch.manual_seed(seed)
    ids = torch.randint(1, 256, (len(pads), length))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("pads", [(0,), (0, 13), (7, 0, 30)])
def test_none_generates_exactly_what_dynamic_cache_does(tiny_llama, pads):
    ids, mask = padded_batch(pads=pads)
    reference = tiny_llama.generate(ids, attention_mask=mask, **GEN)
    with kvfold.compress(tiny_llama, "none") as session:
        ours = tiny_llama.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(ours, reference)
    # padding is dropped: each row holds exactly its real tokens
    expected = [100 - p + GEN["max_new_tokens"] - 1 for p in pads]
    assert session.cache.layers[0].row_lengths()[:, 0].tolist() == expected


def test_multi_token_turn_on_a_filled_cache_matches_dynamic_cache(tiny_llama):
    torch.manual_seed(3)
    first, second = torch.randint(1, 256, (1, 70)), torch.randint(1, 256, (1, 20))
    dynamic = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(first, past_key_values=dynamic)
        expected = tiny_llama(second, past_key_values=dynamic).logits
        with use_kvfold_attention(tiny_llama):
            cache = kvfold.make_cache(tiny_llama, "kivi:8,group=16,residual=16")
            tiny_llama(first, past_key_values=cache)
            got = tiny_llama(second, past_key_values=cache).logits
            cache = kvfold.make_cache(tiny_llama, "none")
            tiny_llama(first, past_key_values=cache)
            exact = tiny_llama(second, past_key_values=cache).logits
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.999


def prefill(model, spec, tokens=300, batch=1, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(1, 256, (batch, tokens))
    with torch.no_grad(), use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        model(ids, past_key_values=cache)
    return cache


def expected_bytes(model, row_lengths_per_layer, page=64, dtype_bytes=4):
    """none/eviction: pages of K and V (dtype) + int32 positions per slot, refcounts, page tables and lengths."""
    dim = model.config.head_dim
    total = 0
    for lengths in row_lengths_per_layer:
        pages = sum(math.ceil(n / page) for n in lengths)
        width = max(math.ceil(n / page) for n in lengths)
        total += pages * page * (2 * dim * dtype_bytes + 4) + pages * 4 + len(lengths) * (width + 1) * 8
    return total


@pytest.mark.parametrize("spec", ["none", "snapkv:0.5", "adakv:0.5", "streaming:0.75"])
def test_nbytes_matches_the_formula_for_eviction(tiny_llama, spec):
    cache = prefill(tiny_llama, spec)
    lengths = [layer.row_lengths().flatten().tolist() for layer in cache.layers]
    assert cache.nbytes() == expected_bytes(tiny_llama, lengths)


@pytest.mark.parametrize("tokens", [300, 301, 317])
def test_kivi_nbytes_matches_the_formula(tiny_llama, tokens):
    bits, group, residual, tail_page = 2, 32, 64, 16
    cache = prefill(tiny_llama, f"kivi:{bits},group={group},residual={residual}", tokens=tokens)
    dim, rows = tiny_llama.config.head_dim, 2
    packed_pages = -(-(tokens - residual) // group)  # per row: the tail keeps at most `residual` tokens
    tail = tokens - packed_pages * group
    tail_pages = math.ceil(tail / tail_page)
    packed_page = 2 * group * dim * bits // 8 + 2 * dim * 2 + 2 * group * 2 + group * 4  # codes, k s/z, v s/z, pos
    full_page = tail_page * (2 * dim * 2 + 4)  # float16 K and V + int32 positions
    per_layer = rows * (packed_pages * (packed_page + 4) + tail_pages * (full_page + 4)) \
        + rows * (packed_pages + 1) * 8 + rows * (tail_pages + 1) * 8
    assert cache.layers[0].full.lengths.tolist() == [tail] * rows and 0 < tail <= residual
    assert cache.nbytes() == per_layer * len(cache.layers)


def test_adakv_rows_are_ragged_and_freed_pages_are_gone(tiny_llama):
    uniform, ragged = prefill(tiny_llama, "snapkv:0.6,window=4"), prefill(tiny_llama, "adakv:0.6,window=4")
    lengths = torch.stack([layer.row_lengths() for layer in ragged.layers])
    assert (lengths.amax(-1) != lengths.amin(-1)).any(), "adakv gave every head the same budget"
    assert ragged.stored_tokens() == uniform.stored_tokens()  # same total budget per layer
    for layer in ragged.layers:  # the pool holds exactly the pages the ragged rows need, nothing more
        assert layer.full.pool.capacity == int(layer.full.pages_per_row().sum())


def test_ratio_bounds_what_is_stored(tiny_llama):
    full = prefill(tiny_llama, "none", tokens=1024)
    half = prefill(tiny_llama, "snapkv:0.5", tokens=1024)
    assert half.stored_tokens() == full.stored_tokens() // 2
    assert half.nbytes() <= 0.55 * full.nbytes()


def test_fork_shares_pages_and_answers_like_a_fresh_prefill(tiny_llama):
    torch.manual_seed(5)
    context, question = torch.randint(1, 256, (1, 200)), torch.randint(1, 256, (1, 12))
    with torch.no_grad(), use_kvfold_attention(tiny_llama):
        parent = kvfold.make_cache(tiny_llama, "snapkv:0.5")
        tiny_llama(context, past_key_values=parent)
        before = parent.nbytes()
        child = parent.fork()
        assert parent.nbytes() == before  # forking copies no page
        assert child.nbytes() == before - parent.table_nbytes() + child.table_nbytes()
        assert child.referenced_nbytes() == parent.referenced_nbytes()  # same pages, same-sized tables
        forked = tiny_llama(question, past_key_values=child, position_ids=torch.arange(200, 212)[None]).logits
        fresh = kvfold.make_cache(tiny_llama, "snapkv:0.5")
        tiny_llama(context, past_key_values=fresh)
        direct = tiny_llama(question, past_key_values=fresh, position_ids=torch.arange(200, 212)[None]).logits
        again = tiny_llama(question, past_key_values=parent.fork(), position_ids=torch.arange(200, 212)[None]).logits
    torch.testing.assert_close(forked, direct)
    torch.testing.assert_close(again, direct)  # the first child's writes did not leak into the parent
    page_bytes = parent.layers[0].full.pool.page_nbytes()
    # the child's 12 new tokens cost at most one copied page plus one new page per row and layer
    assert parent.nbytes() - before <= 2 * page_bytes * 2 * len(parent.layers) + child.table_nbytes()


def test_decode_time_compression_keeps_the_budget(tiny_llama):
    ids, mask = padded_batch(pads=(0,), length=64)
    with kvfold.compress(tiny_llama, "snapkv:0.5,window=8,every=8") as session:
        tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
    seen = 64 + 63
    for layer in session.cache.layers:
        lengths = layer.row_lengths()
        assert (lengths <= math.ceil(0.5 * seen) + 8).all() and (lengths >= 32).all()


def test_cache_refuses_beam_search(tiny_llama):
    ids, mask = padded_batch(pads=(0,), length=16)
    with kvfold.compress(tiny_llama, "none"), pytest.raises(kvfold.KVFoldError, match="beam search"):
        tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, pad_token_id=0)


def test_dropped_forks_give_their_pages_back(tiny_llama):
    torch.manual_seed(6)
    context = torch.randint(1, 256, (1, 200))
    with torch.no_grad(), use_kvfold_attention(tiny_llama):
        parent = kvfold.make_cache(tiny_llama, "snapkv:0.5")
        tiny_llama(context, past_key_values=parent)
        held = []
        for _ in range(3):  # one question after another on a fresh fork: the pool stops growing after the first
            child = parent.fork()
            tiny_llama(torch.randint(1, 256, (1, 80)), past_key_values=child,
                       position_ids=torch.arange(200, 280)[None])
            held.append(parent.nbytes())
            del child
    assert held[1] == held[2] == held[0]


def test_a_fork_made_in_inference_mode_frees_its_pages_when_dropped_outside_it(tiny_llama):
    import gc

    torch.manual_seed(6)
    with torch.inference_mode(), use_kvfold_attention(tiny_llama):
        parent = kvfold.make_cache(tiny_llama, "snapkv:0.5")
        tiny_llama(torch.randint(1, 256, (1, 200)), past_key_values=parent)
        before = [pool.refcount.clone() for layer in parent.layers for pool in layer.pools()]
        child = parent.fork()
        tiny_llama(torch.randint(1, 256, (1, 80)), past_key_values=child, position_ids=torch.arange(200, 280)[None])
    del child
    gc.collect()
    after = [pool.refcount for layer in parent.layers for pool in layer.pools()]
    for old, new, pool in zip(before, after, (p for layer in parent.layers for p in layer.pools())):
        assert torch.equal(new[: len(old)], old) and not new[len(old):].any()
        assert sorted(pool.free) == sorted(torch.nonzero(new == 0).flatten().tolist())  # every free page reusable


def test_compress_contexts_nest_and_restore_the_model(tiny_llama):
    ids = torch.randint(1, 256, (1, 20))
    before = tiny_llama.config._attn_implementation
    with kvfold.compress(tiny_llama, "snapkv:0.5") as outer:
        with kvfold.compress(tiny_llama, "kivi:8") as inner:
            tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)
        tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, pad_token_id=0)
    assert inner.cache.compressor.quantizer is not None and outer.cache.compressor.spec == "snapkv:0.5"
    assert len(inner.caches) == 1 and len(outer.caches) == 1
    assert "generate" not in tiny_llama.__dict__ and tiny_llama.config._attn_implementation == before


def test_remembered_queries_are_a_ring_written_in_place(tiny_llama):
    """Decode-time compression reads the newest `window` queries: a fixed ring (so a CUDA graph's replays update
    it), read oldest first; a fork gets its own."""
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), use_kvfold_attention(tiny_llama):
        cache = kvfold.make_cache(tiny_llama, "snapkv:0.5,window=8,every=64")
        logits = tiny_llama(ids, past_key_values=cache).logits
        layer = cache.layers[0]
        ring = layer.recent_queries[0]
        queries, positions = layer.recent_window()
        assert positions.tolist() == list(range(32, 40)) and queries.shape[2] == 8
        child = cache.fork()
        for step in range(3):
            token = logits[:, -1:].argmax(-1)
            logits = tiny_llama(token, past_key_values=cache, position_ids=torch.tensor([[40 + step]])).logits
        assert layer.recent_queries[0] is ring  # the same tensor, updated in place
        assert layer.recent_window(5)[1].tolist() == [38, 39, 40, 41, 42]
        assert child.layers[0].recent_window()[1].tolist() == list(range(32, 40))
