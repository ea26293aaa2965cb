"""zipvl keeps, per row, the fewest tokens whose attention mass reaches the threshold (plus protected tokens)."""

import pytest
import torch

import kvfold
from kvfold.api import use_kvfold_attention
from kvfold.errors import KVFoldError
from kvfold.methods.base import PROTECTED
from kvfold.methods.zipvl import ZipVLBudget


def kept(scores, threshold):
    return ZipVLBudget(threshold=threshold).select(scores, torch.tensor([1]))


def test_hand_made_rows():
    scores = torch.tensor([[[0.1, 0.5, float("-inf"), 0.3, 0.1, PROTECTED + 9]]], dtype=torch.float64)
    assert torch.nonzero(kept(scores, 0.75)[0, 0]).flatten().tolist() == [1, 3, 5]
    assert kept(scores, 0.85)[0, 0].sum() == 4  # 0.5 + 0.3 + one 0.1, plus the protected token
    assert torch.nonzero(kept(scores, 1.0)[0, 0]).flatten().tolist() == [0, 1, 3, 4, 5]  # never the -inf slot


@pytest.mark.parametrize("threshold", [0.3, 0.8, 0.95, 0.999])
def test_kept_mass_is_exactly_the_smallest_set_reaching_the_threshold(threshold):
    torch.manual_seed(0)
    scores = torch.softmax(torch.randn(2, 3, 200) * 3, dim=-1).double()
    mask = kept(scores, threshold)
    for row, row_mask in zip(scores.reshape(-1, 200), mask.reshape(-1, 200)):
        mass = row[row_mask]
        assert mass.sum() >= threshold * row.sum() - 1e-12
        assert mass.sum() - mass.min() < threshold * row.sum()  # minimal: the smallest kept token was needed
        assert row[~row_mask].max() <= mass.min()  # and the kept ones are the highest


def test_rows_adapt_to_the_input_on_a_model(tiny_llama):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_kvfold_attention(tiny_llama):
        cache = kvfold.make_cache(tiny_llama, "snapkv:window=8@zipvl:threshold=0.9")
        tiny_llama(ids, past_key_values=cache)
        none = kvfold.make_cache(tiny_llama, "none")
        tiny_llama(ids, past_key_values=none)
    lengths = torch.stack([layer.row_lengths().flatten() for layer in cache.layers])
    assert bool((lengths >= 8).all()) and bool((lengths < 300).all())
    assert lengths.unique().numel() > 1  # ragged: each row keeps what its own mass needs
    assert cache.nbytes() < none.nbytes()


@pytest.mark.parametrize("spec, message", [
    ("snapkv@zipvl:threshold=0", "threshold must be in"),
    ("snapkv@zipvl:threshold=1.5", "threshold must be in"),
    ("snapkv@zipvl:threshold=true", "threshold must be in"),
    ("knorm@zipvl", "reads scores as attention mass"),
    ("streaming@zipvl", "reads scores as attention mass"),
])
def test_bad_knobs(spec, message):
    with pytest.raises(KVFoldError, match=message):
        kvfold.Compressor.parse(spec)
