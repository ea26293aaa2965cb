"""PrefixKV: the importance curve `kvfold inspect` writes is the Lorenz curve of the layer's attention mass; one
threshold over the curves gives per-layer fractions averaging to the budget; a concentrated layer keeps fewer
tokens than a spread one; the layer counts sum to the uniform total; a profile of another model, an old profile or
none is a clear error."""

import json

import numpy as np
import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.inspection import InspectConfig, InspectInput, inspect_model
from kvfold.inspection.analysis import importance_curve
from kvfold.methods.base import PROTECTED
from kvfold.methods.prefixkv import inverse_curves, layer_fractions

from ..conftest import make_tiny_llama
from .helpers import run_spec

GRID = np.linspace(0, 1, 101)


@pytest.fixture(scope="module")
def inspected():
    model = make_tiny_llama()
    ids = tuple(torch.randint(10, 256, (64,), generator=torch.Generator().manual_seed(0)).tolist())
    return inspect_model(model, None, InspectInput(ids, {"source": "ids"}, ((20, 22),), (56, 64)),
                         InspectConfig(recent_window=8), model_name="tiny")


def _write(folder, profile) -> str:
    (folder / "profile.json").write_text(json.dumps(profile))
    return str(folder)


@pytest.fixture(scope="module")
def profile_dir(inspected, tmp_path_factory):
    """The tiny Llama's real profile with chosen curves: layer 0 spread (uniform mass), layer 1 half its mass on
    1% of keys, layer 2 everything on 1% of keys."""
    profile = json.loads(json.dumps(inspected.profile))
    uniform = GRID
    half = np.minimum(1.0, np.where(GRID <= 0.01, 50 * GRID, 0.5 + 0.5 * (GRID - 0.01) / 0.99))
    sharp = np.minimum(1.0, 100 * GRID)
    for layer, curve in zip(profile["layers"], (uniform, half, sharp)):
        layer["importance_curve"] = curve.tolist()
    return _write(tmp_path_factory.mktemp("prefix"), profile)


def test_inspect_writes_the_lorenz_curve_of_the_layer_mass(inspected):
    layer = inspected.profile["layers"][1]
    curve = np.array(layer["importance_curve"])
    assert len(curve) == 101 and curve[0] == 0 and abs(curve[-1] - 1) < 1e-4 and np.all(np.diff(curve) >= 0)
    mass = inspected.mass[1]
    ordered = np.sort(mass)[::-1]
    n = len(mass)
    for i in (1, 7, 50, 99):  # at x = i/100 the curve holds the top floor(x n) keys and a part of the next one
        k, part = divmod(i / 100 * n, 1)
        k = int(k)
        assert abs(curve[i] - (ordered[:k].sum() + part * ordered[k]) / mass.sum()) < 2e-5
    by_hand = importance_curve(np.array([3.0, 1.0]), points=3)  # top half of 2 keys holds 3/4
    np.testing.assert_allclose(by_hand, [0, 0.75, 1])


def test_inverse_curve_and_threshold_by_hand():
    curves = torch.tensor(np.stack([GRID, np.minimum(1.0, 2 * GRID)]), dtype=torch.float64)  # uniform; all mass in half
    torch.testing.assert_close(inverse_curves(curves, torch.tensor([0.5, 1.0], dtype=torch.float64)),
                               torch.tensor([[0.5, 0.25], [1.0, 0.5]], dtype=torch.float64))
    # mean of f = p and p / 2 is 0.375 at p = 0.5: the spread layer keeps 0.5, the concentrated one 0.25
    fractions = layer_fractions(curves, torch.tensor([0.375], dtype=torch.float64))
    torch.testing.assert_close(fractions, torch.tensor([[0.5, 0.25]], dtype=torch.float64), atol=1e-9, rtol=0)
    # asking more than p = 1 can give on average (0.75): every layer keeps the asked fraction
    torch.testing.assert_close(layer_fractions(curves, torch.tensor([0.9], dtype=torch.float64)),
                               torch.tensor([[0.9, 0.9]], dtype=torch.float64))


def test_counts_follow_the_curves_and_sum_to_the_uniform_total(profile_dir):
    budget = kvfold.Compressor.parse(f"prefixkv:0.5,profile={profile_dir}").budget
    scores = torch.rand(1, 2, 400, dtype=torch.float64)
    scores[..., -8:] = PROTECTED + torch.arange(8, dtype=torch.float64)
    keep = torch.tensor([200])
    counts = [budget.counts(scores, keep, layer, 3)[0, 0].item() for layer in range(3)]
    assert counts[0] > counts[1] > counts[2] >= 8
    assert abs(sum(counts) - 3 * 200) <= 2  # rounding, one token per layer at most
    for layer in range(3):
        mask = budget.select(scores, keep, layer, 3)
        assert mask.sum(-1).tolist() == [[counts[layer]] * 2] and mask[..., -8:].all()


def test_runs_in_a_model_with_ragged_layers(tiny_llama, profile_dir):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 200))
    cache = run_spec(tiny_llama, f"snapkv:0.5,window=8@prefixkv:profile={profile_dir}", ids, steps=2)
    lengths = [int(layer.row_lengths()[0, 0]) for layer in cache.layers]
    assert lengths[0] > lengths[1] > lengths[2]
    assert abs(sum(lengths) - 3 * (100 + 2)) <= 3
    assert cache.nbytes() < 0.65 * run_spec(tiny_llama, "none", ids, steps=2).nbytes()


def test_bad_profiles_are_clear_errors(inspected, profile_dir, tmp_path):
    with pytest.raises(KVFoldError, match="needs profile="):
        kvfold.Compressor.parse("prefixkv:0.5")
    old = json.loads(json.dumps(inspected.profile))
    for layer in old["layers"]:
        del layer["importance_curve"]
    with pytest.raises(KVFoldError, match="no importance curves"):
        kvfold.Compressor.parse(f"prefixkv:0.5,profile={_write(tmp_path, old)}")
    other = make_tiny_llama(layers=4)
    with pytest.raises(KVFoldError, match="not this one"):
        kvfold.make_cache(other, f"prefixkv:0.5,profile={profile_dir}")
