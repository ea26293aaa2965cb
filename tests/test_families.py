"""Every supported family (GQA, qk-norm, sliding-window layers) runs through kvfold's cache and attention."""

import pytest
import torch

import kvfold
from kvfold.api import use_kvfold_attention

from .tiny_models import FAMILIES, tiny_model

SETTINGS = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)


def batch(vocab: int, length: int = 60, pad: int = 9):
    torch.manual_seed(4)
    ids = torch.randint(1, vocab, (2, length))
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_none_matches_transformers_logits(family):
    model = tiny_model(family)
    ids, mask = batch(model.config.get_text_config().vocab_size)
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                                   **SETTINGS)
        with kvfold.compress(model, "none"):
            ours = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                                  **SETTINGS)
    # compare step by step while the tokens agree (tiny random models can have near-ties)
    for step, (a, b) in enumerate(zip(reference.scores, ours.scores)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"{family} step {step}")
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["snapkv:0.5", "adakv:0.5", "kivi:4,group=16,residual=16"])
def test_methods_run_and_save_memory(family, spec):
    model = tiny_model(family)
    ids, mask = batch(model.config.get_text_config().vocab_size, length=200)
    with kvfold.compress(model, "none") as full, torch.no_grad():
        model.generate(ids, attention_mask=mask, **SETTINGS)
    with kvfold.compress(model, spec) as compressed, torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **SETTINGS)
    assert out.shape == (2, 200 + SETTINGS["max_new_tokens"])
    assert compressed.cache.nbytes() < full.cache.nbytes()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("mistral", "gemma3")])
def test_sliding_layers_hold_only_their_window(family):
    model = tiny_model(family)
    window = model.config.get_text_config().sliding_window
    with torch.no_grad(), use_kvfold_attention(model):
        cache = kvfold.make_cache(model, "none")
        model(torch.randint(1, 100, (1, 300)), past_key_values=cache)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert sliding
    for layer in sliding:  # the last query's window, rounded up to whole pages at most
        assert (layer.row_lengths() <= window + layer.page_size).all()
        assert (layer.row_lengths() >= window).all()
