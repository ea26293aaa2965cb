"""The fast decode loop (kvfold.decoding / kvfold.fastpath) equals the normal path, on ragged batches.

On the CPU the fast loop runs eagerly and the reference reads the tables its steps update in place; with
KVFOLD_KERNELS=triton (TRITON_INTERPRET=1) it runs the kernel over device mirrors of the tables, as on a GPU.
Run on a GPU (TRITON_INTERPRET=0), the same tests exercise the captured CUDA graph.
"""

import importlib.util
import os

import pytest
import torch

import kvfold
from kvfold.api import make_cache, prefill, use_kvfold_attention
from kvfold.decoding import decode, generate_batch
from kvfold.errors import KVFoldError
from kvfold.sampling import Sampling, choose_tokens

from .conftest import make_tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
PROMPTS = [list(range(5, 205)), list(range(30, 130)), [7] + list(range(9, 250))]
SPECS = ["none", "snapkv:0.5", "snapkv:0.5@adakv", "kivi:4,group=16,residual=16,sink=3",
         "snapkv:0.5@adakv+kivi:2,group=16,residual=32", "snapkv:0.5,every=8", "streaming:0.5", "rotate+fp8",
         "h2o:0.5,every=4", "snapkv:0.5,every=8+kivi:4,group=16,residual=16"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama().to(DEVICE)


def kept(cache) -> list:
    return [[p.tolist() for row in layer.kept_positions() for p in row] for layer in cache.layers]


@pytest.mark.parametrize("spec", SPECS)
def test_fast_loop_gives_the_tokens_and_cache_of_the_normal_path(model, spec):
    slow = generate_batch(model, PROMPTS, method=spec, max_new_tokens=40, fast=False)
    fast = generate_batch(model, PROMPTS, method=spec, max_new_tokens=40, fast=True)
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in slow.outputs]
    assert [o.finish_reason for o in fast.outputs] == [o.finish_reason for o in slow.outputs]
    assert fast.forwards == slow.forwards


@pytest.mark.parametrize("spec", ["none", "kivi:4,group=16,residual=16", "snapkv:0.5,every=8", "snapkv:0.5+fp8:group=16",
                                  "h2o:0.5,every=4+kivi:2,group=16,residual=32"])
def test_fast_loop_stores_the_same_tokens_and_gives_its_reserve_back(model, spec):
    ids = torch.tensor([PROMPTS[0]], device=DEVICE)
    caches = []
    with torch.inference_mode(), use_kvfold_attention(model):
        for fast in (False, True):
            cache = make_cache(model, spec)
            logits = prefill(model, cache, ids)
            decode(model, cache, logits, torch.tensor([ids.shape[1]]), 37, fast=fast)
            caches.append(cache)
    slow, fast = caches
    assert kept(fast) == kept(slow)
    for a, b in zip(slow.layers, fast.layers):
        assert a.seen == b.seen and a.valid_seen.tolist() == b.valid_seen.tolist()
        assert a.peak_row_tokens == b.peak_row_tokens
        assert b.fast is None
        for rows in (b.full, b.packed):
            if rows is not None:  # no page held past a row's length once the loop ends
                beyond = torch.arange(rows.table.shape[1]) >= rows.pages_per_row().unsqueeze(1)
                assert bool((rows.table[beyond] < 0).all())


def test_fast_loop_matches_transformers_generate_with_left_padding(model):
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS], device=DEVICE)
    mask = (ids != 0).long()
    mask[2, -len(PROMPTS[2]):] = 1
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    with kvfold.compress(model, "kivi:4,group=16,residual=16"):
        compressed = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    fast_none = generate_batch(model, PROMPTS, max_new_tokens=24)
    fast_kivi = generate_batch(model, PROMPTS, method="kivi:4,group=16,residual=16", max_new_tokens=24)
    for row in range(len(PROMPTS)):
        assert fast_none.outputs[row].tokens == plain[row, longest:].tolist()
        assert fast_kivi.outputs[row].tokens == compressed[row, longest:].tolist()


def test_seeded_sampling_is_the_same_on_both_paths_and_follows_the_seed(model):
    runs = [generate_batch(model, PROMPTS, max_new_tokens=12, fast=fast, sampling=Sampling(0.9, 0.8, seed=seed))
            for fast, seed in ((False, 3), (True, 3), (True, 4))]
    tokens = [[o.tokens for o in r.outputs] for r in runs]
    assert tokens[0] == tokens[1] != tokens[2]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    generator = torch.Generator().manual_seed(0)
    picks = choose_tokens(logits, Sampling(1.0, 0.75), generator)
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.75; tokens 2 and 3 are never drawn
    assert abs(float((picks == 0).float().mean()) - 0.5 / 0.8) < 0.05
    assert choose_tokens(logits[:1], Sampling(), None).tolist() == [0]


def test_sampling_is_greedy_at_zero_and_reproducible_with_a_seed():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))
    assert choose_tokens(logits, Sampling(), None).tolist() == logits.argmax(-1).tolist()
    draws = [choose_tokens(logits, Sampling(1.0, 0.9), torch.Generator().manual_seed(7)).tolist() for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    gen = torch.Generator().manual_seed(3)
    assert len({int(choose_tokens(logits, Sampling(1.5), gen)) for _ in range(50)}) > 5
    nucleus_of_one = {int(choose_tokens(logits, Sampling(1.5, 1e-6), gen)) for _ in range(20)}
    assert nucleus_of_one == {int(logits.argmax())}


def test_a_row_ends_at_its_stop_token_and_the_others_go_on(model):
    free = generate_batch(model, PROMPTS, max_new_tokens=20)
    stop = free.outputs[1].tokens[5]
    model.generation_config.eos_token_id = stop
    try:
        out = generate_batch(model, PROMPTS, max_new_tokens=20)
    finally:
        model.generation_config.eos_token_id = None
    first = free.outputs[1].tokens.index(stop)
    assert out.outputs[1].tokens == free.outputs[1].tokens[:first] and out.outputs[1].finish_reason == "stop"
    for row in (0, 2):
        if stop not in free.outputs[row].tokens:
            assert out.outputs[row].tokens == free.outputs[row].tokens


def test_fast_loop_on_a_fork_leaves_the_parent_untouched(model):
    ids = torch.tensor([PROMPTS[0]], device=DEVICE)
    with torch.inference_mode(), use_kvfold_attention(model):
        parent = make_cache(model, "snapkv:0.5")
        logits = prefill(model, parent, ids)
        before = kept(parent)
        first = decode(model, parent.fork(), logits, torch.tensor([ids.shape[1]]), 30, fast=True)
        assert kept(parent) == before
        second = decode(model, parent.fork(), logits, torch.tensor([ids.shape[1]]), 30, fast=False)
    assert first.tokens == second.tokens


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("spec", ["none", "snapkv:0.5@adakv+rotate+kivi:2,group=16,sink=4"])
def test_fast_loop_through_the_kernel_over_device_tables(model, spec, monkeypatch, merge_in_pytorch):
    monkeypatch.setenv("KVFOLD_KERNELS", "triton")  # interpreted on the CPU: small and short
    prompts = [PROMPTS[0][:70], PROMPTS[1][:40]]
    # The fast loop against the normal one is tested above with the reference; here the kernel against the reference.
    fast = generate_batch(model, prompts, method=spec, max_new_tokens=18, fast=True)  # packs at 80: crosses a tick
    monkeypatch.setenv("KVFOLD_KERNELS", "reference")
    reference = generate_batch(model, prompts, method=spec, max_new_tokens=18, fast=True)
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in reference.outputs]
    assert fast.cuda_graph == (DEVICE == "cuda")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_zipcache_mixed_pages_through_the_kernel_in_the_fast_loop(monkeypatch, merge_in_pytorch):
    """ZipCache's mixed pages (two parts of one page table, 13 and 3 slots a page) through the fast loop's device
    tables, packing while decoding: the same tokens as the reference."""
    from kvfold.kernels.decode import supports

    model = make_tiny_llama(layers=2, head_dim=64).to(DEVICE)
    prompts = [PROMPTS[0][:40], PROMPTS[1][:27]]
    spec = "zipcache:group=16,residual=16,salient=0.8"
    cache = make_cache(model, spec)
    with torch.inference_mode(), use_kvfold_attention(model):
        prefill(model, cache, torch.tensor([prompts[0]], device=DEVICE))
    layer = cache.layers[0]
    assert layer.kernel_readable and supports(layer.kernel_parts(), 64) and layer.packed.lengths.sum() > 0
    monkeypatch.setenv("KVFOLD_KERNELS", "triton")
    fast = generate_batch(model, prompts, method=spec, max_new_tokens=10, fast=True)  # packs at 48: crosses a tick
    monkeypatch.setenv("KVFOLD_KERNELS", "reference")
    reference = generate_batch(model, prompts, method=spec, max_new_tokens=10, fast=True)
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in reference.outputs]


@pytest.mark.parametrize("bad, message", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                          (dict(temperature=float("nan")), "temperature")])
def test_bad_sampling_is_a_clear_error(bad, message):
    with pytest.raises(KVFoldError, match=message):
        Sampling(**bad)


def test_bad_requests_are_clear_errors(model):
    with pytest.raises(KVFoldError, match="at least one token"):
        generate_batch(model, [[1, 2], []])
    with pytest.raises(KVFoldError, match="exceeds the model's context"):
        generate_batch(model, [[1] * 1000], max_new_tokens=100)
    with pytest.raises(KVFoldError, match="tokenizer"):
        generate_batch(model, [[1, 2]], stop=["x"])
    with pytest.raises(KVFoldError, match="max_new_tokens"):
        generate_batch(model, [[1, 2]], max_new_tokens=0)


@pytest.mark.slow
def test_embedded_model_streams_text_stops_at_a_string_and_answers_like_the_normal_path(embedded):
    model, tokenizer = embedded
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("Count from one to twenty in words, separated by commas.", "Name three colours.")]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    free = generate_batch(model, prompts, tokenizer=tokenizer, max_new_tokens=40)
    full = free.outputs[0].text
    stop = full.split()[len(full.split()) // 2]  # a word from the middle of what the model says unprompted
    streamed = {0: "", 1: ""}
    out = generate_batch(model, prompts, tokenizer=tokenizer, max_new_tokens=40, stop=[stop],
                         on_text=lambda row, delta: streamed.__setitem__(row, streamed[row] + delta))
    first = out.outputs[0]
    assert first.finish_reason == "stop" and first.text == full[:full.index(stop)]
    assert streamed[0] == first.text and streamed[1] == out.outputs[1].text  # streamed text is the final text
    context = "The vault code is 4812. The weather was mild and the river ran slowly past the old mill."
    answers = [kvfold.generate(model, tokenizer, context=context, question="What is the vault code?",
                               method="snapkv:0.5", max_new_tokens=12, fast=fast)[0] for fast in (False, True)]
    assert answers[0].tokens == answers[1].tokens
