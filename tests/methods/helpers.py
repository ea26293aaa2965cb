"""Shared by the method tests: run a spec through prefill and a few decode steps, eager attention maps, and the
embedded-model check that a method runs and its cache is smaller than `none`'s."""

from __future__ import annotations

import math

import torch

import kvfold
from kvfold.api import use_kvfold_attention


def run_spec(model, spec: str, ids: torch.Tensor, steps: int = 0):
    """Prefill `ids` [1, n] into a fresh cache for `spec`, then `steps` greedy decode steps; returns the cache."""
    n = ids.shape[1]
    with torch.no_grad(), use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        logits = model(ids, past_key_values=cache).logits
        for step in range(steps):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, past_key_values=cache, position_ids=torch.tensor([[n + step]])).logits
    return cache


def next_token_cosines(specs, tokens: int = 200, seed: int = 1) -> dict[str, float]:
    """Cosine similarity to `none` of the next-token logits after a `tokens`-token prefill, per spec, on a smooth tiny
    llama (init 0.02, closer to a trained model's sensitivity than the wide default)."""
    from ..conftest import make_tiny_llama

    model = make_tiny_llama(init=0.02)
    torch.manual_seed(seed)
    ids, nxt = torch.randint(1, 256, (1, tokens)), torch.randint(1, 256, (1, 1))
    logits = {}
    with torch.no_grad(), use_kvfold_attention(model):
        for spec in ("none", *specs):
            cache = kvfold.make_cache(model, spec)
            model(ids, past_key_values=cache)
            logits[spec] = model(nxt, past_key_values=cache, position_ids=torch.tensor([[tokens]])).logits.flatten()
    return {spec: float(torch.nn.functional.cosine_similarity(logits["none"], logits[spec], dim=0)) for spec in specs}


def kept(cache) -> list[list[torch.Tensor]]:
    """Positions held per layer and KV head of batch element 0, as int64."""
    return [[p.long() for p in layer.kept_positions()[0]] for layer in cache.layers]


def eager_attentions(model, ids: torch.Tensor):
    """Eager attention maps [batch, q_heads, n, n] of every layer (the independent reference)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)


def uniform_rows(cache, tokens_per_row: int) -> None:
    """Every row of every layer holds `tokens_per_row` tokens, by both of the cache's accountings."""
    heads = cache.layers[0].kv_heads
    for layer in cache.layers:
        assert layer.row_lengths().flatten().tolist() == [tokens_per_row] * heads
        assert all(len(p) == tokens_per_row for p in layer.kept_positions()[0])
    assert cache.stored_tokens() == len(cache.layers) * heads * tokens_per_row


def none_bytes(model, ids: torch.Tensor, steps: int = 0) -> int:
    return run_spec(model, "none", ids, steps).nbytes()


_NONE_ANSWERS: dict[int, object] = {}


def embedded_run(model, tokenizer, method: str):
    """`kvfold.generate` on a 1k-token needle sample with `method`, and with `none` (computed once per session):
    (answer, none's answer)."""
    from kvfold.bench.tasks import needle_sample

    sample = needle_sample(tokenizer, length=1024, depth=0.5, seed=0)

    def answer(spec):
        return kvfold.generate(model, tokenizer, context=sample.context, question=sample.question, method=spec,
                               max_new_tokens=6)[0]

    if id(model) not in _NONE_ANSWERS:
        _NONE_ANSWERS[id(model)] = answer("none")
    return answer(method), _NONE_ANSWERS[id(model)]


def rope_free_inputs():
    """Small random `ScoreInputs` without RoPE frequencies (for the scorers that need them to refuse)."""
    from kvfold.methods.base import ScoreInputs

    return ScoreInputs(torch.randn(1, 2, 4, 8), torch.arange(4), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8),
                       torch.arange(6).view(1, 1, -1), torch.ones(1, 1, 6, dtype=torch.bool), 0.3)


def ceil_half(n: int) -> int:
    return math.ceil(0.5 * n)
