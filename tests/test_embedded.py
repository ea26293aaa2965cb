"""End to end on the embedded SmolLM2-135M-Instruct (CPU): exactness, bytes, needles, forks, bad input."""

import pytest
import torch

import kvfold
from kvfold.api import use_kvfold_attention
from kvfold.bench.tasks import needle_samples, score_contains

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue, then list three colours.",
    "What is the capital of France? Answer and then describe the city in detail.",
]


def chat_ids(tokenizer, texts):
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True) for t in texts]
    return tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("batch", [[0], [1], [2], [0, 1]])
def test_none_is_token_identical_to_dynamic_cache(embedded, batch):
    model, tokenizer = embedded
    inputs = chat_ids(tokenizer, [PROMPTS[i] for i in batch])
    settings = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reference = model.generate(**inputs, **settings)
    with kvfold.compress(model, "none"):
        ours = model.generate(**inputs, **settings)
    assert ours.shape[1] - inputs["input_ids"].shape[1] >= 32
    assert torch.equal(ours, reference)


def prefill_cache(model, ids, spec):
    with torch.no_grad(), use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        logits = model(ids, past_key_values=cache).logits[:, -1]
    return cache, logits


def kv_elements(model, tokens):
    config = model.config
    return 2 * tokens * config.num_hidden_layers * config.num_key_value_heads * config.head_dim


@pytest.fixture(scope="module")
def long_ids(embedded):
    _, tokenizer = embedded
    sample = needle_samples(tokenizer, length=4000, depths=[0.5], seed=7)[0]
    head, tail = kvfold.split_prompt(tokenizer, sample.context, sample.question)
    return torch.tensor([head + tail])


def test_bytes_and_logits_of_kivi(embedded, long_ids):
    model, _ = embedded
    tokens = long_ids.shape[1]
    assert tokens >= 3900
    full, full_logits = prefill_cache(model, long_ids, "none")  # eviction's bytes: test_cache, on a tiny model
    kivi2, _ = prefill_cache(model, long_ids, "kivi:2,group=64,residual=128")
    assert kivi2.nbytes() <= 0.20 * kv_elements(model, tokens) * 2  # the same KV in bf16
    kivi4, kivi4_logits = prefill_cache(model, long_ids, "kivi:4")
    cosine = torch.nn.functional.cosine_similarity(full_logits.flatten(), kivi4_logits.flatten(), dim=0)
    assert cosine >= 0.99
    # the float32 baseline holds exactly 4 bytes per element plus positions and tables
    assert full.nbytes() >= kv_elements(model, tokens) * 4


@pytest.fixture(scope="module")
def needles(embedded):
    _, tokenizer = embedded
    return needle_samples(tokenizer, length=2000, depths=[0.1, 0.3, 0.5, 0.7, 0.9], seed=0)


def answer(embedded, sample, spec, agnostic=False):
    model, tokenizer = embedded
    return kvfold.generate(model, tokenizer, context=sample.context, question=sample.question, method=spec,
                           agnostic=agnostic, max_new_tokens=24)[0]


def test_needles_none_and_kivi(embedded, needles):
    shallow_middle_deep = needles[::2]  # depths 10%, 50%, 90% (the suite's time budget)
    found = {spec: [score_contains(answer(embedded, s, spec).text, s.answer) for s in shallow_middle_deep]
             for spec in ("none", "kivi:4")}
    assert found["none"] == [1.0] * len(shallow_middle_deep)
    assert found["kivi:4"] == found["none"]


def test_streaming_finds_the_needle_exactly_when_it_is_kept(embedded, needles):
    _, tokenizer = embedded
    for sample in needles[1:4]:  # depths 30% (evicted), 50%, 70% (kept): both outcomes, in the time budget
        head, tail = kvfold.split_prompt(tokenizer, sample.context, sample.question)
        total = len(head) + len(tail)
        kept_from = total - (-(-total // 2) - 4)  # streaming:0.5 keeps 4 sinks + the newest ceil(total/2) - 4
        start, _ = needle_span(tokenizer, head, sample)
        got = score_contains(answer(embedded, sample, "streaming:0.5").text, sample.answer)
        assert got == float(start >= kept_from), f"depth {sample.meta['depth']}: kept={start >= kept_from}"


def needle_span(tokenizer, head, sample):
    """Token positions of the needle's value inside the prompt."""
    value_ids = tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
    for start in range(len(head) - len(value_ids) + 1):
        if head[start:start + len(value_ids)] == value_ids:
            return start, start + len(value_ids)
    text = tokenizer.decode(head)
    index = text.index(sample.answer)
    prefix = tokenizer(text[:index], add_special_tokens=False)["input_ids"]
    return len(prefix) - 1, len(prefix) + len(value_ids) + 1


def test_forks_answer_like_fresh_prefills_and_share_pages(embedded, needles):
    model, tokenizer = embedded
    sample = needles[2]
    questions = [sample.question, "What is the text about? Answer in a few words."]
    together = kvfold.generate(model, tokenizer, context=sample.context, question=questions, method="snapkv:0.5",
                               agnostic=True, max_new_tokens=12)
    alone = [kvfold.generate(model, tokenizer, context=sample.context, question=q, method="snapkv:0.5",
                             agnostic=True, max_new_tokens=12)[0] for q in questions]
    assert [a.tokens for a in together] == [a.tokens for a in alone]
    # the second answer's pool holds the shared context once plus the first fork's pages, not two contexts
    assert together[1].kv_bytes < 1.5 * alone[1].kv_bytes


def test_bad_inputs(embedded):
    model, tokenizer = embedded
    with pytest.raises(kvfold.KVFoldError, match="context is empty"):
        kvfold.generate(model, tokenizer, context="  ", question="q")
    with pytest.raises(kvfold.KVFoldError, match="exceeds the model's context of 8192"):
        kvfold.generate(model, tokenizer, context="word " * 9000, question="q")
    with pytest.raises(kvfold.KVFoldError, match="did you mean 'snapkv'"):
        kvfold.generate(model, tokenizer, context="text", question="q", method="snapk:0.5")


def test_chat_keeps_the_history_compressed(embedded):
    from kvfold.chat import ChatSession

    model, tokenizer = embedded
    session = ChatSession(model, tokenizer, "snapkv:0.5,window=16")
    story = "My name is Ada and I live in a lighthouse on a small island. " * 12
    first = session.send(story + "Where do I live?", max_new_tokens=16)
    after_first = session.cache.stored_tokens()
    second = session.send("And what is my name?", max_new_tokens=16)
    assert first.strip() and second.strip()
    assert session.tokens_seen == session.cache.get_seq_length()
    # the long first turn was compressed; the cache holds far fewer tokens than it has seen
    per_layer_row = model.config.num_hidden_layers * model.config.num_key_value_heads
    assert session.cache.stored_tokens() / per_layer_row < 0.7 * session.tokens_seen
    assert session.cache.stored_tokens() > after_first
    assert session.cache.nbytes() < session.uncompressed_bytes()
