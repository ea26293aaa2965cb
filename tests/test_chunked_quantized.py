"""Chunked prefill with eviction and a quantizer: with `defer=False` kept tokens are packed after each chunk and
packed tokens are final, so the prefill's peak holds them packed; with `defer=True` (the default) they stay in full
precision until the prompt ends, so every chunk's eviction may still drop any of them."""

import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.layer import KVFoldLayer

from .test_chunked import run

torch.set_grad_enabled(False)

SPEC = "snapkv:budget=256+kivi:4,group=32,residual=32,defer=false"


def watch_chunks(monkeypatch) -> list[dict]:
    """Record, after every chunk of layer 0, the positions it holds packed and the tail's length per row."""
    ingest, seen = KVFoldLayer.ingest, []

    def watched(self, *args, **kwargs):
        ingest(self, *args, **kwargs)
        if self.chunking and self.layer_idx == 0:
            packed = [set(p.tolist()) for p in _packed_positions(self)]
            seen.append({"packed": packed, "tail": self.full.lengths.tolist()})

    monkeypatch.setattr(KVFoldLayer, "ingest", watched)
    return seen


def _packed_positions(layer: KVFoldLayer) -> list[torch.Tensor]:
    if layer.packed.table.shape[1] == 0:
        return [torch.empty(0, dtype=torch.int32)] * layer.packed.rows
    fields, valid = next(layer.packed.read(("pos",), page_chunk=layer.packed.table.shape[1]))
    return [row[ok] for row, ok in zip(fields["pos"].flatten(1), valid)]


def test_chunks_pack_as_they_go_and_packed_tokens_stay(tiny_llama, monkeypatch):
    seen = watch_chunks(monkeypatch)
    ids = torch.randint(1, 256, (1, 600), generator=torch.Generator().manual_seed(6))
    cache, _ = run(tiny_llama, SPEC, ids, chunk=100)
    layer = cache.layers[0]
    assert len(seen) == 6
    for step in seen:  # after eviction the tail keeps at most residual + group - 1 tokens: the rest is packed
        assert max(step["tail"]) <= 32 + 31
    assert sum(len(p) for p in seen[1]["packed"]) > 0
    final = [set(p.tolist()) for p in _packed_positions(layer)]
    for before, after in zip(seen, seen[1:]):  # a packed token is never evicted by a later chunk
        assert all(b <= a for b, a in zip(before["packed"], after["packed"]))
    assert all(b <= f for b, f in zip(seen[-1]["packed"], final))
    assert layer.row_lengths().flatten().tolist() == [256] * layer.kv_heads
    assert all(int(p.max()) == 599 for row in layer.kept_positions() for p in row)


def test_packing_as_it_goes_lowers_the_peak(tiny_llama):
    """The full-precision pool never holds more than a chunk plus the residual per row; with `defer` it holds the
    whole kept set plus a chunk. Packed bytes are the same either way: the same number of tokens is packed."""
    ids = torch.randint(1, 256, (1, 900), generator=torch.Generator().manual_seed(7))
    cache, _ = run(tiny_llama, SPEC, ids, chunk=100)
    deferred, _ = run(tiny_llama, SPEC.replace("defer=false", "defer=true"), ids, chunk=100)
    rows, page = cache.layers[0].kv_heads, cache.layers[0].page_size
    fp_pages_per_row = -(-(100 + 32 + 31) // page) + 1
    for layer, other in zip(cache.layers, deferred.layers):
        assert layer.full.pool.peak_capacity <= rows * fp_pages_per_row
        assert other.full.pool.peak_capacity >= rows * (256 + 100) // page
        assert layer.packed.lengths.tolist() == other.packed.lengths.tolist()
    assert cache.peak_nbytes() < 0.6 * deferred.peak_nbytes()
    held = [sum(pool.nbytes() for pool in layer.pools()) for layer in cache.layers]
    assert held == [sum(pool.nbytes() for pool in layer.pools()) for layer in deferred.layers]


def test_defer_keeps_every_kept_token_in_full_precision_until_the_end(tiny_llama, monkeypatch):
    seen = watch_chunks(monkeypatch)
    ids = torch.randint(1, 256, (2, 500), generator=torch.Generator().manual_seed(8))
    deferred, _ = run(tiny_llama, SPEC.replace("defer=false", "defer=true"), ids, chunk=90)
    assert len(seen) == 6 and all(not any(step["packed"]) for step in seen)
    assert [step["tail"][0] for step in seen] == [90, 180, 256, 256, 256, 256]  # the whole kept set, 16-bit
    layer = deferred.layers[0]
    assert layer.packed.lengths.tolist() == [224] * 4 and layer.full.lengths.tolist() == [32] * 4


@pytest.mark.parametrize("spec", ["snapkv:budget=128@adakv+kivi:2,group=32,residual=32",
                                  "h2o:budget=128@pyramidkv+kivi:4,group=32,residual=32",
                                  "snapkv:budget=128,window=8,sink=4+fp8:residual=16",
                                  "streaming:budget=96+kivi:4,group=16,residual=16,sink=8"])
def test_budgets_and_sinks_hold_with_packing_as_it_goes(tiny_llama, spec):
    ids = torch.randint(1, 256, (1, 500), generator=torch.Generator().manual_seed(9))
    cache, logits = run(tiny_llama, spec.replace("residual=", "defer=false,residual="), ids, chunk=64)
    deferred, _ = run(tiny_llama, spec, ids, chunk=64)  # the default
    assert torch.isfinite(logits).all()
    for layer, other in zip(cache.layers, deferred.layers):  # the budget gives every row the same count
        held, budget = layer.row_lengths(), other.row_lengths()
        if "adakv" in spec:  # a head whose share shrank keeps what it packed: the layer may hold a little more
            assert int(budget.sum()) <= int(held.sum()) <= 1.1 * int(budget.sum())
        else:
            assert torch.equal(held, budget)
        assert int(layer.packed.lengths.sum()) > 0
    if "sink=8" in spec:  # the quantizer's sinks are each row's first tokens, split off with the first chunk
        assert all(int(p.min()) == 0 and int((p < 8).sum()) == 8 for row in cache.layers[0].kept_positions()
                   for p in row)


def test_defer_is_a_checked_knob_on_by_default():
    assert kvfold.Compressor.parse("kivi:4").quantizer.defer is True
    assert kvfold.Compressor.parse("kivi:4,defer=false").quantizer.defer is False
    assert "defer=False" in kvfold.Compressor.parse("snapkv:0.5+kivi:4,defer=false").spec
    with pytest.raises(KVFoldError, match="defer must be true or false"):
        kvfold.Compressor.parse("kivi:4,defer=2")
    with pytest.raises(KVFoldError, match="defer must be true or false"):
        kvfold.Compressor.parse("fp8:defer=yes")


def test_packed_tokens_are_rounded_once(tiny_llama):
    """Packing as it goes never re-quantizes: every packed key and value of the first layer (whose K/V do not
    depend on what the cache kept) is within half a quantization step of its exact value."""
    from transformers import DynamicCache

    ids = torch.randint(1, 256, (1, 600), generator=torch.Generator().manual_seed(10))
    exact = DynamicCache()
    tiny_llama(ids, past_key_values=exact, use_cache=True)
    keys, values = (t[0].float() for t in (exact.layers[0].keys, exact.layers[0].values))  # [heads, 600, dim]
    cache, _ = run(tiny_llama, SPEC, ids, chunk=100)
    layer = cache.layers[0]
    fields, valid = next(layer.packed.read(tuple(layer.packed.pool.fields), page_chunk=layer.packed.table.shape[1]))
    decoded_k, decoded_v = layer.compressor.quantizer.decode(fields)
    positions = fields["pos"].flatten(1).long()
    key_step = fields["k_scale"].float().repeat_interleave(32, dim=1)  # per channel, shared by a page's tokens
    value_step = fields["v_scale"].float().flatten(1, 2)  # per token: one value group (head_dim <= 32)
    for row in range(layer.kv_heads):
        ok = valid[row]
        pos = positions[row][ok]
        key_error = (decoded_k[row][ok] - keys[row, pos]).abs()
        value_error = (decoded_v[row][ok] - values[row, pos]).abs()
        assert (key_error <= 0.5 * key_step[row][ok] + 2e-3 * keys[row, pos].abs() + 1e-5).all()
        assert (value_error <= 0.5 * value_step[row][ok] + 2e-3 * values[row, pos].abs() + 1e-5).all()
        assert len(pos) == 224 and len(set(pos.tolist())) == 224


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_layers_pack_as_they_go(family):
    """Sliding layers (window 64) drop whole packed pages that left the window, oldest first: packing after each
    chunk keeps the pages in position order, so they still can."""
    from .tiny_models import tiny_model

    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 400), generator=torch.Generator().manual_seed(11))
    spec = "snapkv:budget=96,window=8+kivi:4,group=16,residual=16"
    cache, logits = run(model, spec + ",defer=false", ids, chunk=64)
    deferred, _ = run(model, spec, ids, chunk=64)  # the default
    assert torch.isfinite(logits).all()
    for layer, other in zip(cache.layers, deferred.layers):
        assert all(int(p.max()) == 399 for row in layer.kept_positions() for p in row)
        if layer.is_sliding:  # nothing older than the window's pages stays
            assert all(int(p.min()) >= 399 - 64 - 16 for row in layer.kept_positions() for p in row)
        else:
            assert torch.equal(layer.row_lengths(), other.row_lengths())
