"""A recorded one-pass prefill replayed into any method's cache equals that method's own prefill (`kvfold.replay`)."""

from __future__ import annotations

import pytest
import torch

import kvfold
from kvfold.api import decode_greedy, prefill, use_kvfold_attention
from kvfold.replay import record_prefill, replay_prefill

SPECS = ["none", "snapkv:0.5", "streaming:0.5", "h2o:0.5", "tova:0.5", "knorm:0.5", "expected:0.5",
         "pyramidkv:0.5", "adakv:0.5", "snapkv:0.5@adakv", "zipvl", "taskkv:0.5", "snapkv:0.5+merge",
         "kivi:4,group=16,residual=16", "kivi:2,group=16,residual=16,sink=4", "snapkv:0.5+kivi:4,group=16,residual=16",
         "fp8", "kv4:4,group=16,residual=16", "zipcache:group=16,residual=16", "rotate+kivi:4,group=16,residual=16",
         "xkv"]


def direct(model, spec, ids):
    cache = kvfold.make_cache(model, spec)
    with use_kvfold_attention(model):
        logits = prefill(model, cache, ids)
    return cache, logits


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def recording(tiny_llama, prompt):
    return record_prefill(tiny_llama, prompt)


@pytest.mark.parametrize("spec", SPECS)
def test_a_replayed_prefill_is_the_method_s_own_prefill(tiny_llama, prompt, recording, spec):
    """Same bytes, same stored tokens, same greedy continuation, from one recording shared by every method."""
    cache, logits = direct(tiny_llama, spec, prompt)
    replayed = replay_prefill(tiny_llama, recording, spec)
    assert torch.equal(recording.logits, logits)
    assert replayed.nbytes() == cache.nbytes()
    assert replayed.stored_tokens() == cache.stored_tokens()
    with use_kvfold_attention(tiny_llama):
        want = decode_greedy(tiny_llama, cache, logits, prompt.shape[1], 12, set())
        got = decode_greedy(tiny_llama, replayed, recording.logits, prompt.shape[1], 12, set())
    assert got == want


def test_the_recording_is_not_changed_by_a_replay(tiny_llama, recording):
    before = [(layer.keys.clone(), layer.values.clone(), layer.query.clone()) for layer in recording.layers]
    replay_prefill(tiny_llama, recording, "snapkv:0.5+merge+kivi:2,group=16,residual=16")
    for (k, v, q), layer in zip(before, recording.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values) and torch.equal(q, layer.query)
    assert recording.tokens == 150 and recording.nbytes() > 0


@pytest.mark.parametrize("agnostic", [False, True])
def test_generate_shared_answers_as_generate_does(embedded_tokenizer, agnostic):
    """Each method's answers from one shared forward per prompt are `generate`'s, question by question; only the
    wanted (method, question) pairs are answered."""
    from kvfold.api import generate
    from kvfold.compressor import Compressor
    from kvfold.replay import generate_shared

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=len(embedded_tokenizer), max_position_embeddings=2048, initializer_range=0.2,
        attn_implementation="sdpa")).eval()
    context = " ".join(f"Item {i} is stored in box {i * 7 % 31}." for i in range(25))
    questions = ["Where is item 3?", "Where is item 17?"]
    specs = ["none", "snapkv:0.5", "snapkv:0.5+kivi:2,group=16,residual=16"]
    methods = [Compressor.parse(s) for s in specs]
    wanted = {0: [0, 1], 1: [1], 2: [0, 1]}
    got = {(m, q): a for m, q, a in generate_shared(model, embedded_tokenizer, context=context,
                                                    questions=questions, methods=methods, wanted=wanted,
                                                    agnostic=agnostic, max_new_tokens=6)}
    assert sorted(got) == sorted((m, q) for m, qs in wanted.items() for q in qs)
    for m, spec in enumerate(specs):
        want = generate(model, embedded_tokenizer, context=context, question=questions, method=spec,
                        agnostic=agnostic, max_new_tokens=6)
        for q in wanted[m]:
            assert got[m, q].tokens == want[q].tokens, (spec, q)
            assert got[m, q].kv_bytes == want[q].kv_bytes
            assert got[m, q].prefill_seconds > 0
