"""Chunked prefill (`prefill_chunk=N`): equal to one pass when nothing is evicted, and never holding more than
budget + one chunk per row, by the cache's own accounting."""

import pytest
import torch

import kvfold
from kvfold.api import prefill, use_kvfold_attention
from kvfold.errors import KVFoldError

from .tiny_models import FAMILIES, tiny_model

torch.set_grad_enabled(False)


def run(model, spec, ids, chunk=None, **kwargs):
    with use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        logits = prefill(model, cache, ids, chunk=chunk, **kwargs)
    return cache, logits


@pytest.mark.parametrize("chunk", [1, 37, 64, 100, 299])
@pytest.mark.parametrize("spec", ["none", "snapkv:budget=400", "snapkv:0.0", "streaming:budget=300"])
def test_a_budget_covering_the_context_gives_the_one_pass_logits(tiny_llama, spec, chunk):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(chunk))
    whole, expected = run(tiny_llama, "none", ids)
    cache, logits = run(tiny_llama, spec, ids, chunk)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    assert cache.stored_tokens() == whole.stored_tokens()
    assert cache.get_seq_length() == 300


def test_long_chunks_attend_in_query_blocks_like_one_pass(tiny_llama):
    """Chunks longer than the query block (256) attend block by block over the decoded store."""
    ids = torch.randint(1, 256, (1, 900), generator=torch.Generator().manual_seed(10))
    _, expected = run(tiny_llama, "none", ids)
    _, logits = run(tiny_llama, "none", ids, chunk=600)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_chunked_equals_one_pass(family):
    """Sliding-window layers (mistral, gemma3: window 64) included: the chunks' attention sees the right keys."""
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    _, expected = run(model, "none", ids)
    _, logits = run(model, "none", ids, chunk=48)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def test_left_padded_batches_chunk_like_one_pass(tiny_llama):
    ids = torch.randint(1, 256, (2, 160), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :30] = 0  # row 0 is left-padded
    whole, expected = run(tiny_llama, "none", ids, attention_mask=mask)
    cache, logits = run(tiny_llama, "none", ids, chunk=50, attention_mask=mask)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    assert [int(n) for n in cache.layers[0].row_lengths()[:, 0]] == [130, 160]


@pytest.mark.parametrize("spec", ["snapkv:budget=64", "streaming:budget=64", "snapkv:budget=64@adakv",
                                  "snapkv:budget=64,window=8,sink=4"])
@pytest.mark.parametrize("chunk", [32, 100])
def test_rows_never_exceed_budget_plus_one_chunk(tiny_llama, spec, chunk):
    ids = torch.randint(1, 256, (1, 500), generator=torch.Generator().manual_seed(3))
    cache, _ = run(tiny_llama, spec, ids, chunk)
    heads = cache.layers[0].kv_heads
    if "adakv" in spec:  # one budget per layer, shared across heads: a head may hold more, the layer never
        for layer in cache.layers:
            assert int(layer.row_lengths().sum()) == 64 * heads
        assert cache.peak_row_tokens() <= 64 * heads + chunk
    else:
        assert cache.peak_row_tokens() <= 64 + chunk
        for layer in cache.layers:
            assert layer.row_lengths().flatten().tolist() == [64] * heads
    one_pass, _ = run(tiny_llama, spec, ids)
    assert cache.nbytes() <= one_pass.nbytes() * 1.25  # ragged rows may round to a few more pages


@pytest.mark.parametrize("scorer", sorted(n for n, c in kvfold.registered_methods().items()
                                           if c.kind == "scorer" and n != "none"))
def test_every_scorer_keeps_its_budget_through_chunks(tiny_llama, scorer):
    ids = torch.randint(1, 256, (1, 400), generator=torch.Generator().manual_seed(12))
    window = ",window=8" if scorer not in ("tova", "streaming") else ""
    cache, _ = run(tiny_llama, f"{scorer}:budget=64{window}", ids, chunk=50)
    assert cache.peak_row_tokens() <= 64 + 50
    for layer in cache.layers:
        assert layer.row_lengths().flatten().tolist() == [64] * layer.kv_heads
        assert all(int(p.max()) == 399 for row in layer.kept_positions() for p in row)  # the newest is kept


@pytest.mark.parametrize("spec", ["snapkv:budget=96@pyramidkv", "h2o:budget=96@adakv"])
def test_budgets_compose_with_chunks(tiny_llama, spec):
    ids = torch.randint(1, 256, (1, 400), generator=torch.Generator().manual_seed(13))
    cache, _ = run(tiny_llama, spec, ids, chunk=64)
    one_pass, _ = run(tiny_llama, spec, ids)
    assert [int(layer.row_lengths().sum()) for layer in cache.layers] == \
        [int(layer.row_lengths().sum()) for layer in one_pass.layers]


def test_ratio_budget_tracks_what_has_been_read(tiny_llama):
    ids = torch.randint(1, 256, (1, 400), generator=torch.Generator().manual_seed(4))
    cache, _ = run(tiny_llama, "snapkv:0.75", ids, chunk=64)
    assert cache.layers[0].row_lengths().flatten().tolist() == [100, 100]  # ceil(0.25 * 400)
    assert cache.peak_row_tokens() <= 100 + 64


def test_peak_bytes_are_bounded_and_given_back(tiny_llama):
    """Pool capacity peaks at about budget + chunk per row, and the pages the chunks needed are returned."""
    ids = torch.randint(1, 256, (1, 600), generator=torch.Generator().manual_seed(5))
    layers, rows, page = len(tiny_llama.model.layers), 2, 64
    token_bytes = 2 * 16 * 4 + 4  # K and V float32 of head_dim 16, plus the int32 position
    cache, _ = run(tiny_llama, "snapkv:budget=128", ids, chunk=128)
    pages_at_peak = -(-(128 + 128) // page)
    assert cache.peak_nbytes() <= layers * rows * (pages_at_peak + 1) * page * (token_bytes + 4) + cache.table_nbytes()
    one_pass, _ = run(tiny_llama, "snapkv:budget=128", ids)
    assert cache.nbytes() == one_pass.nbytes()


@pytest.mark.parametrize("spec", ["kivi:4", "snapkv:budget=128", "snapkv:budget=128+kivi:2,group=32,residual=32"])
def test_between_chunks_a_layer_holds_only_the_pages_it_uses(tiny_llama, spec, monkeypatch):
    """Pages a chunk needed and packing or eviction emptied go back to the allocator after each chunk, so a chunked
    prefill's peak holds one layer's chunk beyond what the layers keep (not one chunk per layer: on an 8B model at
    4 x 32k, 2 GB of 16-bit chunk pages)."""
    from kvfold.layer import KVFoldLayer

    ingest, free_after_ingest = KVFoldLayer.ingest, []

    def watched(self, *args, **kwargs):
        ingest(self, *args, **kwargs)
        if self.chunking:
            free_after_ingest.append(sum(len(pool.free) for pool in self.pools()))

    monkeypatch.setattr(KVFoldLayer, "ingest", watched)
    ids = torch.randint(1, 256, (1, 600), generator=torch.Generator().manual_seed(9))
    cache, _ = run(tiny_llama, spec, ids, chunk=100)
    assert len(free_after_ingest) == 6 * len(tiny_llama.model.layers) and set(free_after_ingest) == {0}
    monkeypatch.setattr(KVFoldLayer, "ingest", ingest)
    one_pass, _ = run(tiny_llama, spec, ids)
    assert cache.layers[0].row_lengths().tolist() == one_pass.layers[0].row_lengths().tolist()


def test_quantized_eviction_packs_what_the_chunks_kept(tiny_llama):
    ids = torch.randint(1, 256, (1, 600), generator=torch.Generator().manual_seed(6))
    cache, _ = run(tiny_llama, "snapkv:budget=256+kivi:4,group=32,residual=32", ids, chunk=100)
    layer = cache.layers[0]
    assert layer.row_lengths().flatten().tolist() == [256, 256]
    assert layer.packed.lengths.tolist() == [224, 224] and layer.full.lengths.tolist() == [32, 32]
    fp_only, _ = run(tiny_llama, "snapkv:budget=256", ids, chunk=100)
    assert cache.nbytes() < 0.6 * fp_only.nbytes()


def test_quantizer_alone_packs_as_it_reads(tiny_llama):
    ids = torch.randint(1, 256, (1, 600), generator=torch.Generator().manual_seed(7))
    cache, _ = run(tiny_llama, "kivi:4", ids, chunk=100)
    one_pass, _ = run(tiny_llama, "kivi:4", ids)
    assert cache.layers[0].row_lengths().tolist() == one_pass.layers[0].row_lengths().tolist()
    assert cache.nbytes() <= one_pass.nbytes() * 1.05  # same tokens packed; only table widths may differ


def test_probe_tokens_score_but_are_not_stored(tiny_llama):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(8))
    probe = [5, 6, 7, 8, 9, 10]
    cache, _ = run(tiny_llama, "snapkv:budget=64,window=8", ids, chunk=64, probe_ids=probe)
    assert cache.get_seq_length() == 300
    for layer in cache.layers:
        positions = torch.cat([p for row in layer.kept_positions() for p in row])
        assert int(positions.max()) == 299 and len(positions) == 64 * layer.kv_heads
    assert all(not layer.chunking and layer.probe_tokens == 0 for layer in cache.layers)


def test_generate_and_model_generate_take_prefill_chunk(tiny_llama):
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(9))
    with kvfold.compress(tiny_llama, "snapkv:budget=500") as session:
        plain = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False)
    with kvfold.compress(tiny_llama, "snapkv:budget=500", prefill_chunk=32) as session:
        chunked = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, chunked)
    assert session.cache.get_seq_length() == 127
    with kvfold.compress(tiny_llama, "snapkv:budget=40", prefill_chunk=32) as session:
        tiny_llama.generate(ids, max_new_tokens=8, do_sample=False)
    assert session.cache.peak_row_tokens() <= 40 + 32 + 1


@pytest.mark.parametrize("chunk", [0, -5, 2.5, True])
def test_bad_chunks_are_clear_errors(tiny_llama, chunk):
    ids = torch.randint(1, 256, (1, 20))
    with pytest.raises(KVFoldError, match="prefill_chunk must be a positive number"):
        run(tiny_llama, "none", ids, chunk)
    with pytest.raises(KVFoldError, match="prefill_chunk"):
        with kvfold.compress(tiny_llama, "none", prefill_chunk=chunk):
            pass


@pytest.mark.parametrize("spec, message", [
    ("snapkv:budget=16", "smaller than the protected tokens"),  # window 32 by default
    ("snapkv:budget=10,window=4,sink=8", "smaller than the protected tokens"),
    ("snapkv:0.5,budget=100", "either a ratio or a token budget"),
    ("snapkv:budget=-3", "budget must be an integer >= 0"),
    ("streaming:budget=64,window=8", "window= and budget= both fix the cache size"),
])
def test_bad_budgets_are_clear_errors(spec, message):
    with pytest.raises(KVFoldError, match=message):
        kvfold.Compressor.parse(spec)


@pytest.mark.slow
def test_embedded_model_through_chunks(embedded):
    """On the real model: chunks with a budget covering the prompt give the one-pass logits; with a real budget
    the answer comes from a cache as small as the one pass leaves, and never more than budget + chunk per row."""
    model, tokenizer = embedded
    from kvfold.bench.tasks import needle_sample

    sample = needle_sample(tokenizer, length=1536, depth=0.4, seed=1)
    head, tail = kvfold.split_prompt(tokenizer, sample.context, sample.question)
    ids = torch.tensor([head + tail])
    _, expected = run(model, "none", ids)
    covering, logits = run(model, "snapkv:budget=4096", ids, chunk=512, probe_ids=tail)
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=1e-3)
    assert covering.stored_tokens() == len(head + tail) * len(model.model.layers) * 3
    bounded, _ = run(model, "snapkv:budget=512", ids, chunk=512, probe_ids=tail)
    one_pass, _ = run(model, "snapkv:budget=512", ids)
    assert bounded.peak_row_tokens() <= 512 + 512
    assert bounded.nbytes() == one_pass.nbytes()
    answer, = kvfold.generate(model, tokenizer, context=sample.context, question=sample.question,
                              method="snapkv:budget=512", prefill_chunk=512, max_new_tokens=8)
    assert answer.tokens and answer.kv_bytes < 0.5 * covering.nbytes()


def test_a_chunk_packed_whole_leaves_an_empty_tail_that_still_reads(tiny_llama):
    """Chunks of whole quantizer groups with no residual pack every token, so the tail's pool gives back all its
    pages between chunks while its table keeps its width; the next chunk still reads it (an empty pool)."""
    ids = torch.randint(1, 256, (2, 640), generator=torch.Generator().manual_seed(9))
    cache, logits = run(tiny_llama, "kivi:4,group=32,residual=0", ids, chunk=128)
    layer = cache.layers[0]
    assert layer.full.pool.capacity == 0 and layer.packed.lengths.tolist() == [640] * 2 * layer.kv_heads
    one_pass, expected = run(tiny_llama, "kivi:4,group=32,residual=0", ids)
    assert layer.packed.page_ids().numel() == one_pass.layers[0].packed.page_ids().numel()
    assert torch.isfinite(logits).all() and logits.shape == expected.shape


def test_the_mask_of_a_turn_after_a_past_is_its_last_row():
    from transformers.masking_utils import sdpa_mask

    from kvfold.attention import kvfold_mask

    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[0, :3] = False
    full = sdpa_mask(batch_size=2, q_length=5, kv_length=12, q_offset=7, attention_mask=padding)
    last = kvfold_mask(batch_size=2, q_length=5, kv_length=12, q_offset=7, attention_mask=padding)
    assert full.shape == (2, 1, 5, 12) and last.shape == (2, 1, 1, 12)
    assert torch.equal(last, full[:, :, -1:])
    first = kvfold_mask(batch_size=2, q_length=12, kv_length=12, q_offset=0, attention_mask=padding)
    assert torch.equal(first, sdpa_mask(batch_size=2, q_length=12, kv_length=12, q_offset=0, attention_mask=padding))


def test_a_turn_over_another_caches_past_under_kvfold_attention_equals_sdpa(tiny_llama):
    """A `DynamicCache` past with kvfold attention: the turn's full causal mask is rebuilt from the last row."""
    from transformers import DynamicCache

    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    logits = {}
    for kvfold_attention in (False, True):
        cache = DynamicCache()
        with use_kvfold_attention(tiny_llama) if kvfold_attention else torch.no_grad():
            tiny_llama(ids[:, :30], attention_mask=mask[:, :30], past_key_values=cache)
            logits[kvfold_attention] = tiny_llama(ids[:, 30:], attention_mask=mask, past_key_values=cache).logits
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
