"""One prompt forward, many methods: record what each layer's compression step receives during a one-pass prefill,
then build any method's compressed cache from the recording without running the model again.

In a one-pass prefill every layer attends to the whole prompt before its method sees it (`attention.kvfold_attention`
attends the staged keys and values, then calls `KVFoldLayer.ingest`), so the forward — its hidden states, the last
position's logits, and each layer's (keys, values, queries) — is the same whatever the method. Only `ingest`
differs. `kvfold bench --shared-prefill` uses this to prefill each prompt once for all the methods of a sweep.
A chunked prefill is not shareable: each chunk attends to what the method kept of the ones before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .api import (Answer, check_prompt_fits, decode_answer, forward_tokens, make_cache, prefill, split_prompt,
                  stop_token_ids, use_kvfold_attention)
from .cache import KVFoldCache
from .compressor import Compressor
from .models import context_limit


@dataclass(frozen=True)
class LayerInputs:
    """The arguments one layer's `ingest` received: the prompt's keys and values [batch, kv_heads, tokens, dim],
    its queries [batch, heads, tokens, dim], which tokens are real [batch, tokens] and the softmax scale."""

    keys: torch.Tensor
    values: torch.Tensor
    query: torch.Tensor
    valid: torch.Tensor
    scale: float


@dataclass(frozen=True)
class PrefillRecording:
    """A one-pass prefill of `tokens` tokens: every layer's `LayerInputs`, the last position's logits, and the
    seconds the forward took."""

    layers: tuple[LayerInputs, ...]
    logits: torch.Tensor
    tokens: int
    seconds: float

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.keys, layer.values, layer.query, layer.valid))


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor) -> PrefillRecording:
    """Run the prompt `input_ids` [batch, n] through `model` once and keep each layer's compression inputs (nothing
    is stored in a cache meanwhile)."""
    cache = make_cache(model, "none")
    recorded: dict[int, LayerInputs] = {}

    def recorder(index: int):
        def ingest(staged, query, valid, scale) -> None:
            if index in recorded:
                raise RuntimeError(f"layer {index} ingested twice in one forward")
            recorded[index] = LayerInputs(staged.keys, staged.values, query, valid, scale)
        return ingest

    for index, layer in enumerate(cache.layers):
        layer.ingest = recorder(index)  # instance attribute: shadows the method for this cache only
    start = time.perf_counter()
    with use_kvfold_attention(model):
        logits = prefill(model, cache, input_ids)
    seconds = time.perf_counter() - start
    if sorted(recorded) != list(range(len(cache.layers))):
        raise RuntimeError(f"the prefill reached {len(recorded)} of {len(cache.layers)} layers' compression step")
    return PrefillRecording(tuple(recorded[i] for i in range(len(cache.layers))), logits, input_ids.shape[1], seconds)


@torch.no_grad()
def replay_prefill(model, recording: PrefillRecording, method: str | Compressor) -> KVFoldCache:
    """The cache `prefill(model, make_cache(model, method), input_ids)` would have made for the recorded prompt:
    each layer stages the recorded keys and values and compresses them with the recorded queries. The tensors are
    copied, so one recording serves any number of methods."""
    cache = make_cache(model, method)
    for layer, inputs in zip(cache.layers, recording.layers, strict=True):
        staged, _ = layer.update(inputs.keys.clone(), inputs.values.clone())
        layer.ingest(staged, inputs.query.clone(), inputs.valid.clone(), inputs.scale)
    return cache


@torch.no_grad()
def generate_shared(model, tokenizer, *, context: str, questions: Sequence[str], methods: Sequence[Compressor],
                    wanted: Mapping[int, Sequence[int]], agnostic: bool = False, max_new_tokens: int = 32,
                    fast: bool = False) -> Iterator[tuple[int, int, Answer]]:
    """`api.generate` for several methods at once, the model's prompt forward run once and replayed into each
    method's cache: yields (method index, question index, Answer) for each question index in `wanted[method
    index]`, with the same tokens as `generate` gives. Query-aware: one recording per question (context +
    question); query-agnostic: one of the context, each method's cache then forked per question. An answer's
    `prefill_seconds` counts the shared forward, the method's replay and (agnostic) the question's own forward;
    agnostic, as in `generate`, only a method's first question pays for the context."""
    limit = context_limit(model.config)
    stop_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    prompts = [split_prompt(tokenizer, context, q) for q in questions]
    for head, tail in prompts:
        check_prompt_fits(len(head) + len(tail), max_new_tokens, limit)

    def answer(cache: KVFoldCache, logits: torch.Tensor, seen: int, prefill_seconds: float) -> Answer:
        with use_kvfold_attention(model):
            return decode_answer(model, tokenizer, cache, logits, seen, max_new_tokens, stop_ids, fast,
                                 prefill_seconds)

    if agnostic:
        head = prompts[0][0]
        recording = record_prefill(model, torch.tensor([head], device=device))
        for m, method in enumerate(methods):
            first = True
            for q in wanted.get(m, ()):
                start = time.perf_counter()
                if first:
                    shared = replay_prefill(model, recording, method)
                cache = shared.fork()
                with use_kvfold_attention(model):
                    logits = forward_tokens(model, cache, prompts[q][1], len(head))
                seconds = time.perf_counter() - start + (recording.seconds if first else 0.0)
                first = False
                yield m, q, answer(cache, logits, len(head) + len(prompts[q][1]), seconds)
        return
    for q, (head, tail) in enumerate(prompts):
        users = [m for m in range(len(methods)) if q in wanted.get(m, ())]
        if not users:
            continue
        recording = record_prefill(model, torch.tensor([head + tail], device=device))
        for m in users:
            start = time.perf_counter()
            cache = replay_prefill(model, recording, methods[m])
            seconds = time.perf_counter() - start + recording.seconds
            yield m, q, answer(cache, recording.logits, len(head) + len(tail), seconds)
