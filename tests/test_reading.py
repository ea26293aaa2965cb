"""Multi-token turns over the store through SDPA on the gathered store (the CUDA path of chunked prefill) equal the
float32 reference: directly, and end to end through chunked prefill (forced on the CPU)."""

import pytest
import torch

import kvfold
from kvfold import reading
from kvfold.api import prefill, use_kvfold_attention
from kvfold.kernels.reference import KVChunk, paged_attention

from .tiny_models import FAMILIES, tiny_model

torch.set_grad_enabled(False)


def _store(rows: int, dim: int, gen: torch.Generator) -> list[KVChunk]:
    """Two stored chunks with ragged validity and gaps in positions, then a turn of 9 new tokens at 40..48."""
    chunks = []
    for lo in (0, 20):
        pos = torch.sort(torch.randperm(20, generator=gen)[:12] + lo).values.expand(rows, 12).clone()
        valid = torch.rand(rows, 12, generator=gen) > 0.3
        chunks.append(KVChunk(torch.randn(rows, 12, dim, generator=gen), torch.randn(rows, 12, dim, generator=gen),
                              pos, valid))
    valid = torch.ones(rows, 9, dtype=torch.bool)
    valid[0] = False  # a row whose turn is all padding
    chunks.append(KVChunk(torch.randn(rows, 9, dim, generator=gen), torch.randn(rows, 9, dim, generator=gen),
                          torch.arange(40, 49).expand(rows, 9), valid))
    return chunks


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("block", [2, 1024])
def test_sdpa_over_store_equals_the_reference(group, window, block):
    gen = torch.Generator().manual_seed(group * 10 + (window or 0) + block)
    rows, dim, n = 4, 16, 9
    chunks = _store(rows, dim, gen)
    chunks[0].valid[1] = False  # no stored token at all in row 1
    chunks[1].valid[1] = False
    query = torch.randn(rows, group, n, dim, generator=gen)
    positions = torch.arange(40, 49)
    got = reading.sdpa_over_store(query, positions, chunks, 0.25, window, block=block)
    want = paged_attention(query.reshape(rows, group * n, dim), positions.repeat(group), chunks, 0.25, window)
    torch.testing.assert_close(got, want.view(rows, group, n, dim), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dim", [16, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_after_store_equals_the_reference(group, dim, dtype):
    """One causal-lower-right call with validity in an extra channel: ragged stored validity, a row with no stored
    token, a row whose turn is all padding (its queries see only the store), head dims needing padding."""
    gen = torch.Generator().manual_seed(group * 100 + dim)
    rows, n = 4, 9
    chunks = _store(rows, dim, gen)
    chunks[0].valid[1] = False
    chunks[1].valid[1] = False
    chunks[0].keys[2, ~chunks[0].valid[2]] = float("nan")  # what an invalid slot holds must not matter
    query = torch.randn(rows, group, n, dim, generator=gen)
    positions = torch.arange(40, 49)
    got = reading.sdpa_after_store(query.to(dtype), chunks[:2], chunks[2], 0.25)
    want = paged_attention(query.reshape(rows, group * n, dim), positions.repeat(group), chunks, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert got.dtype == dtype and got.shape == (rows, group, n, dim)
    torch.testing.assert_close(got.float(), want.view(rows, group, n, dim), atol=tol, rtol=tol)
    assert torch.equal(got[1, :, :, :].float().abs().sum((0, 2)) == 0, ~chunks[2].valid[1])  # sees nothing: zeros


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention needs CUDA")
@pytest.mark.parametrize("rows,group,n,stored,dim,check_memory", [(8, 4, 512, 3000, 128, True),
                                                                   (6, 3, 64, 700, 64, False)])
def test_sdpa_after_store_runs_flash_on_cuda_and_matches_the_masked_blocks(rows, group, n, stored, dim,
                                                                          check_memory):
    """Memory is checked on the large case only: with one query block per head FlashAttention splits the keys and
    keeps float32 partial outputs (measured 2.6 MB on an H200 for the small case), as large as a per-head copy."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=gen)
    valid = torch.rand(rows, stored, **kw) > 0.2
    positions = torch.arange(stored, device="cuda").expand(rows, stored)
    store = KVChunk(torch.randn(rows, stored, dim, **kw), torch.randn(rows, stored, dim, **kw), positions, valid)
    turn_valid = torch.ones(rows, n, dtype=torch.bool, device="cuda")
    turn_valid[0, :n // 2] = False  # left padding
    turn_positions = torch.arange(stored, stored + n, device="cuda")
    turn = KVChunk(torch.randn(rows, n, dim, **kw), torch.randn(rows, n, dim, **kw),
                   turn_positions.expand(rows, n), turn_valid)
    query = torch.randn(rows, group, n, dim, **kw).bfloat16()
    assert reading.flash_after_store_applies(query)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = reading.sdpa_after_store(query, [store], turn, dim ** -0.5)
    gathered = 2 * rows * (stored + n) * reading._flash_width(dim) * 2  # keys and values, bfloat16
    transient = torch.cuda.max_memory_allocated() - before
    assert not check_memory or transient < gathered + 4 * query.numel() * 2 + store.keys.numel() * 4, transient  # no copy per head
    want = reading.sdpa_over_store(query, turn_positions, [store, turn], dim ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def _run(model, spec, ids, chunk, **kwargs):
    with use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        logits = prefill(model, cache, ids, chunk=chunk, **kwargs)
    return cache, logits


@pytest.fixture
def gathered(monkeypatch):
    monkeypatch.setattr(reading, "use_gathered_sdpa", lambda device: True)


@pytest.mark.parametrize("spec", ["none", "snapkv:budget=64@adakv", "snapkv:0.5+kivi:4", "kivi:4,group=16,residual=16",
                                  "zipcache:4,group=16,residual=16", "fp8"])
def test_chunked_prefill_through_gathered_sdpa_equals_the_reference(tiny_llama, spec, monkeypatch):
    ids = torch.randint(1, 256, (2, 230), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    ref_cache, ref = _run(tiny_llama, spec, ids, 60, attention_mask=mask)
    # The paths agree to float32 rounding; fp8's per-token rounding can turn such a difference in one layer's
    # output into one float8 step of a stored element in the next (on one AMD EPYC: logits 1.5e-3 apart, their
    # std 1.6), so its bound is looser: a causal mask off by one moves them by 1.7, a scale 1% off by 0.2.
    tolerance = dict(atol=1e-2, rtol=1e-2) if spec == "fp8" else dict(atol=2e-4, rtol=1e-4)
    monkeypatch.setattr(reading, "use_gathered_sdpa", lambda device: True)
    monkeypatch.setattr(reading, "SDPA_MASK_ELEMENTS", 2**14)  # several masked blocks: where one call is chosen
    calls = []
    one_call_attention = reading.sdpa_after_store
    monkeypatch.setattr(reading, "sdpa_after_store", lambda *a: calls.append(1) or one_call_attention(*a))
    for one_call in (False, True):  # masked blocks (`sdpa_over_store`), then one call (`sdpa_after_store`)
        monkeypatch.setattr(reading, "flash_after_store_applies", lambda query: one_call)
        calls.clear()
        cache, logits = _run(tiny_llama, spec, ids, 60, attention_mask=mask)
        assert bool(calls) == one_call
        torch.testing.assert_close(logits, ref, **tolerance)
        for a, b in zip(cache.layers, ref_cache.layers):
            assert all(torch.equal(x, y) for x, y in zip(a.kept_positions()[0], b.kept_positions()[0]))
            assert a.stored_slots() == sum(c.keys.shape[1] for c in a.chunks())  # what sdpa_after_store allocates


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("mistral", "gemma3")])
def test_sliding_window_families_through_gathered_sdpa(family, gathered):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    _, expected = _run(model, "none", ids, None)
    _, logits = _run(model, "none", ids, 48)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
