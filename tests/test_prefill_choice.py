"""`KVFOLD_PREFILL=int8|sparse` chooses the prefill's math; where the Triton kernel does not run (the CPU, float32
activations, `KVFOLD_KERNELS=reference`) its reference computes the same math, so the approximation can be
measured on any machine. No Triton needed here."""

import pytest
import torch

from kvfold.api import prefill, use_kvfold_attention
from kvfold.cache import KVFoldCache
from kvfold.kernels import reference

from .conftest import make_tiny_llama


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def prefill_logits(model, ids, monkeypatch, choice: str | None, attention_mask=None):
    if choice is None:
        monkeypatch.delenv("KVFOLD_PREFILL", raising=False)
    else:
        monkeypatch.setenv("KVFOLD_PREFILL", choice)
    with torch.inference_mode(), use_kvfold_attention(model):
        return prefill(model, KVFoldCache(model.config, "none"), ids, attention_mask=attention_mask)


@pytest.mark.parametrize("choice, function, close", [("sparse:gamma=0.9,block=16", "block_sparse_attention", 0.99),
                                                     ("sparse:gamma=1,block=16", "block_sparse_attention", 1 - 1e-6),
                                                     ("sparse:gamma=0.95,block=16,estimate=int4,rows=4",
                                                      "block_sparse_attention", 0.99),
                                                     ("sparse:gamma=0.97,block=16,estimate=int8,reduce=max",
                                                      "block_sparse_attention", 0.99),
                                                     ("int8", "int8_prefill_attention", 0.999),
                                                     ("int8:pv=fp8", "int8_prefill_attention", 0.99)])
def test_the_prefill_choice_runs_its_reference_on_the_cpu(monkeypatch, choice, function, close):
    """Every layer's first prefill goes through the reference (float32 model on the CPU); the logits stay close to
    exact attention's, and equal them where the choice keeps every block (gamma=1)."""
    model = make_tiny_llama(init=0.02, head_dim=32)
    ids = torch.randint(1, 256, (1, 80))
    calls = []
    original = getattr(reference, function)
    monkeypatch.setattr(reference, function, lambda *a, **k: calls.append(1) or original(*a, **k))
    exact = prefill_logits(model, ids, monkeypatch, None)
    assert not calls
    approximate = prefill_logits(model, ids, monkeypatch, choice)
    assert len(calls) == model.config.num_hidden_layers
    assert cosine(approximate, exact) > close
    padded = torch.ones(2, 80, dtype=torch.long)
    padded[1, :10] = 0  # left padding: the choices take no padding mask, so SDPA runs
    prefill_logits(model, ids.repeat(2, 1), monkeypatch, choice, attention_mask=padded)
    assert len(calls) == model.config.num_hidden_layers


def test_the_references_compute_in_row_chunks_with_the_same_result(monkeypatch):
    """The prefill references bound their memory by query-row chunks: small chunks give the same output."""
    from kvfold.kernels.pattern import flexprefill_mask

    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    mask, _ = flexprefill_mask(query, key, 0.25, gamma=0.8, block=16)
    whole = (reference.block_sparse_attention(query, key, value, mask, 0.25, 16),
             reference.int8_prefill_attention(query, key, value, 0.25, pv_fp8=True),
             reference.int8_prefill_attention(query[:, :, 70:], key, value, 0.25))
    chunks = reference._row_chunks
    seen = []
    monkeypatch.setattr(reference, "_row_chunks", lambda rows, columns, heads: seen.append(1) or chunks(
        rows, columns, heads, elements=4 * 100 * 7))  # 7 rows a chunk
    chunked = (reference.block_sparse_attention(query, key, value, mask, 0.25, 16),
               reference.int8_prefill_attention(query, key, value, 0.25, pv_fp8=True),
               reference.int8_prefill_attention(query[:, :, 70:], key, value, 0.25))
    assert len(seen) == 3 and len(list(chunks(100, 100, 4, elements=4 * 100 * 7))) == 15
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
