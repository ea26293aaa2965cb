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


def _run(model, spec, ids, chunk, **kwargs):
    with use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        logits = prefill(model, cache, ids, chunk=chunk, **kwargs)
    return cache, logits


@pytest.fixture
def gathered(monkeypatch):
    monkeypatch.setattr(reading, "use_gathered_sdpa", lambda device: True)


@pytest.mark.parametrize("spec", ["none", "snapkv:budget=64@adakv", "snapkv:0.5+kivi:4"])
def test_chunked_prefill_through_gathered_sdpa_equals_the_reference(tiny_llama, spec, monkeypatch):
    ids = torch.randint(1, 256, (2, 230), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    ref_cache, ref = _run(tiny_llama, spec, ids, 60, attention_mask=mask)
    monkeypatch.setattr(reading, "use_gathered_sdpa", lambda device: True)
    cache, logits = _run(tiny_llama, spec, ids, 60, attention_mask=mask)
    torch.testing.assert_close(logits, ref, atol=2e-4, rtol=1e-4)
    for a, b in zip(cache.layers, ref_cache.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.kept_positions()[0], b.kept_positions()[0]))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("mistral", "gemma3")])
def test_sliding_window_families_through_gathered_sdpa(family, gathered):
    model = tiny_model(family)
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    _, expected = _run(model, "none", ids, None)
    _, logits = _run(model, "none", ids, 48)
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
