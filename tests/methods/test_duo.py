"""duo: the profile's lowest-retrieval KV heads keep only sink + window (pages freed, rows ragged), the others
keep everything; a profile of another model, or none, is a clear error."""

import json

import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.inspection import InspectConfig, InspectInput, inspect_model

from ..conftest import make_tiny_llama
from .helpers import run_spec

TOKENS = 300


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    """A real profile of the tiny Llama (kvfold inspect's code path) with chosen retrieval scores."""
    model = make_tiny_llama()
    ids = tuple(torch.randint(10, 256, (64,), generator=torch.Generator().manual_seed(0)).tolist())
    result = inspect_model(model, None, InspectInput(ids, {"source": "ids"}, ((20, 22),), (56, 64)),
                           InspectConfig(recent_window=8), model_name="tiny")
    profile = result.profile
    # 3 layers x 4 query heads (2 KV heads, groups of 2): KV head score = the larger of its two query heads
    chosen = [[0.9, 0.0, 0.01, 0.02], [0.03, 0.5, 0.04, 0.05], [0.06, 0.07, 0.6, 0.0]]
    for layer, scores in zip(profile["layers"], chosen):
        for head, score in zip(layer["heads"], scores):
            head["retrieval"] = score
    folder = tmp_path_factory.mktemp("profile")
    (folder / "profile.json").write_text(json.dumps(profile))
    return folder


def test_lowest_scoring_kv_heads_become_streaming(profile_dir):
    budget = kvfold.Compressor.parse(f"duo:profile={profile_dir},streaming=0.5").budget
    # KV-head scores: layer 0 (0.9, 0.02), layer 1 (0.5, 0.05), layer 2 (0.07, 0.6) -> the 3 lowest stream
    assert budget.streaming_heads().tolist() == [[False, True], [False, True], [True, False]]
    none = kvfold.Compressor.parse(f"duo:profile={profile_dir},streaming=0").budget
    assert not none.streaming_heads().any()


def test_streaming_heads_keep_sink_and_window_and_the_rest_everything(tiny_llama, profile_dir):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, TOKENS))
    cache = run_spec(tiny_llama, f"duo:profile={profile_dir},window=16,sink=4", ids, steps=2)
    streaming = kvfold.Compressor.parse(f"duo:profile={profile_dir}").budget.streaming_heads()
    for layer, heads in zip(cache.layers, streaming):
        kept = layer.kept_positions()[0]
        for head, is_streaming in enumerate(heads.tolist()):
            if is_streaming:  # the 4 first, the 16 newest of the prompt, then the 2 decoded tokens
                expected = list(range(4)) + list(range(TOKENS - 16, TOKENS + 2))
            else:
                expected = list(range(TOKENS + 2))
            assert kept[head].tolist() == expected
    full = run_spec(tiny_llama, "none", ids, steps=2)
    assert cache.nbytes() < 0.65 * full.nbytes()  # half the heads hold 22 of 302 tokens: 6 pages of 10


def test_profile_errors_name_the_fix(tiny_llama, profile_dir, tmp_path):
    with pytest.raises(KVFoldError, match="needs profile="):
        kvfold.Compressor.parse("duo:streaming=0.5")
    with pytest.raises(KVFoldError, match="does not exist"):
        kvfold.Compressor.parse(f"duo:profile={tmp_path / 'missing'}")
    with pytest.raises(KVFoldError, match=r"streaming must be in \[0, 1\]"):
        kvfold.Compressor.parse(f"duo:profile={profile_dir},streaming=1.5")
    other = make_tiny_llama(layers=2)
    with pytest.raises(KVFoldError, match="kvfold inspect --model"):
        kvfold.make_cache(other, f"duo:profile={profile_dir}")
