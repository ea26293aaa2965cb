"""xKV: the cross-layer SVD is the best joint low-rank fit (exact at full rank), a full-rank cache answers like `none`,
the latents are counted once per group and shared by forks, ragged batches work, and bad compositions are errors."""

import pytest
import torch

import kvfold
from kvfold.api import prefill, use_kvfold_attention
from kvfold.decoding import generate_batch
from kvfold.errors import KVFoldError
from kvfold.methods.xkv import XKV, cross_layer_svd

from ..conftest import make_tiny_llama
from .helpers import next_token_cosines, run_spec


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(init=0.02, layers=4)  # 4 query heads, 2 KV heads, head_dim 16


def test_cross_layer_svd_is_the_best_joint_fit():
    torch.manual_seed(0)
    shared = torch.randn(300, 6)
    blocks = [shared @ torch.randn(6, 32) + 0.01 * torch.randn(300, 32) for _ in range(3)]
    latents, bases = cross_layer_svd(blocks, 96)
    assert all(torch.allclose(latents @ b, x, atol=1e-4) for b, x in zip(bases, blocks))  # full rank: exact
    latents, bases = cross_layer_svd(blocks, 4)
    error = sum((latents @ b - x).pow(2).sum() for b, x in zip(bases, blocks))
    singular = torch.linalg.svdvals(torch.cat(blocks, dim=1))
    torch.testing.assert_close(error, singular[4:].pow(2).sum(), rtol=1e-3, atol=1e-3)  # Eckart–Young
    assert latents.shape == (300, 4) and [b.shape for b in bases] == [(4, 32)] * 3


def test_full_rank_answers_like_none(model):
    assert next_token_cosines(["xkv:1.0,value=1.0"])["xkv:1.0,value=1.0"] > 0.999999
    ids = torch.randint(1, 256, (1, 150))
    exact = run_spec(model, "none", ids, steps=12)
    factored = run_spec(model, "xkv:1.0,value=1.0", ids, steps=12)
    assert all(layer.lowrank is not None for layer in factored.layers)
    held = lambda cache: [[p.tolist() for p in layer.kept_positions()[0]] for layer in cache.layers]  # noqa: E731
    assert held(factored) == held(exact) == [[list(range(162))] * 2] * 4


def test_default_ranks_stay_close_and_hold_far_fewer_bytes(model):
    assert next_token_cosines(["xkv"])["xkv"] >= 0.99
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 1000))
    none, factored = run_spec(model, "none", ids), run_spec(model, "xkv", ids)
    width = 4 * 2 * 16  # one group of 4 layers x 2 KV heads x head_dim 16
    key_rank, value_rank = XKV().ranks(width)
    latents = 1000 * (key_rank + value_rank) * 4 + 1000 * 4  # float32 latents, int32 positions
    bases = (key_rank + value_rank) * width * 4
    assert factored.lowrank_nbytes() == latents + bases
    assert factored.nbytes() == latents + bases + factored.table_nbytes()  # every prompt page went back
    assert factored.nbytes() < 0.2 * none.nbytes()


def test_groups_forks_and_ragged_batches(model):
    torch.manual_seed(0)
    cache = run_spec(model, "xkv:0.5,layers=3", torch.randint(1, 256, (1, 120)))
    first, last = cache.layers[0].lowrank, cache.layers[3].lowrank
    assert first is cache.layers[2].lowrank and first is not last  # groups of 3 layers, then the rest
    assert first.key_latents[0].shape[1] == 48 and last.key_latents[0].shape[1] == 16  # half of each group's width
    before = cache.nbytes()
    child = cache.fork()
    assert child.layers[0].lowrank is first and cache.nbytes() == before
    prompts = [list(range(5, 95)), list(range(7, 47))]
    exact = generate_batch(model, prompts, method="none", max_new_tokens=8, fast=False)
    for fast in (False, True):  # the normal path and the fast loop (pages written in place, reference reads)
        factored = generate_batch(model, prompts, method="xkv:1.0,value=1.0", max_new_tokens=8, fast=fast)
        assert [o.tokens for o in factored.outputs] == [o.tokens for o in exact.outputs]


def test_decoding_attends_in_the_latent_space_like_the_rebuilt_prompt(model):
    """q·(latent Bk) = (q Bkᵀ)·latent and Σ p (latent Bv) = (Σ p latent) Bv: the latent chunk gives the attention of
    the rebuilt K and V (ragged batch: the shorter row's padding stays invisible) without rebuilding them."""
    from kvfold.kernels.reference import KVChunk, LatentChunk, paged_attention

    prompts = [list(range(5, 125)), list(range(7, 67))]
    cache = kvfold.make_cache(model, "xkv:0.5,layers=2")
    ids = torch.tensor([prompts[0], [0] * 60 + prompts[1]])
    mask = torch.ones_like(ids)
    mask[1, :60] = 0
    with torch.inference_mode(), use_kvfold_attention(model):
        prefill(model, cache, ids, attention_mask=mask)
    layer = cache.layers[1]
    latent = next(layer.chunks(latent=True))
    rebuilt = next(layer.chunks())
    assert isinstance(latent, LatentChunk) and isinstance(rebuilt, KVChunk)
    assert latent.key_latents.shape[-1] == 32  # half of the group width: 2 layers x 2 KV heads x head_dim 16
    torch.manual_seed(0)
    query = torch.randn(rebuilt.keys.shape[0], 3, 16)
    positions = torch.full((3,), 200)
    torch.testing.assert_close(paged_attention(query, positions, [latent], 0.25),
                               paged_attention(query, positions, [rebuilt], 0.25), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec, message", [
    ("snapkv:0.5+xkv", "does not compose"), ("xkv+kivi:4", "does not compose"),
    ("xkv:0", "key must be in"), ("xkv:value=1.5", "value must be in"), ("xkv:layers=0", "layers must be"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(KVFoldError, match=message):
        kvfold.make_cache(make_tiny_llama(), spec)


def test_sliding_windows_and_chunked_prefill_are_clear_errors(model):
    from ..tiny_models import tiny_model

    with pytest.raises(KVFoldError, match="sliding-window"):
        kvfold.make_cache(tiny_model("mistral"), "xkv")
    with torch.no_grad(), use_kvfold_attention(model), pytest.raises(KVFoldError, match="prefill chunking"):
        prefill(model, kvfold.make_cache(model, "xkv"), torch.randint(1, 256, (1, 200)), chunk=64)


def test_ranks_follow_the_group_width():
    assert XKV().ranks(4096) == (256, 768)  # the paper's Llama-3.1-8B setting: 4 layers x 8 heads x 128
    assert XKV(key=0.001).ranks(100) == (1, 19)


@pytest.fixture(scope="module")
def xkv_calibration(model, tmp_path_factory):
    """Offline xkv bases of the tiny model (4 layers, one group of width 128) at full rank, from random passages."""
    from kvfold.calibration import fit_xkv, save_calibration

    torch.manual_seed(3)
    passages = [torch.randint(1, 256, (1, 200)) for _ in range(3)]
    result = fit_xkv(model, passages, XKV(key=1.0, value=1.0))
    return save_calibration(result, tmp_path_factory.mktemp("xkv") / "tiny.safetensors", "tiny-llama-4")


def test_calibrated_bases_project_without_an_svd(model, xkv_calibration):
    from kvfold.calibration import load_calibration

    tensors, metadata = load_calibration(xkv_calibration, "xkv")
    basis = tensors["groups.0.key_basis"]
    torch.testing.assert_close(basis @ basis.T, torch.eye(128), atol=1e-4, rtol=0)  # orthonormal rows
    assert metadata["method"] == "xkv:1.0,value=1.0"
    torch.manual_seed(0)
    prompts = [list(range(5, 95)), list(range(7, 47))]
    exact = generate_batch(model, prompts, method="none", max_new_tokens=6, fast=False)
    full = generate_batch(model, prompts, method=f"xkv:1.0,value=1.0,calib={xkv_calibration}", max_new_tokens=6)
    assert [o.tokens for o in full.outputs] == [o.tokens for o in exact.outputs]  # a complete basis is exact
    cache = run_spec(model, f"xkv:0.25,value=0.5,calib={xkv_calibration}", torch.randint(1, 256, (1, 300)))
    latents = cache.layers[0].lowrank
    assert latents.key_latents[0].shape == (300, 32) and latents.value_latents[0].shape == (300, 64)
    assert cache.lowrank_nbytes() == 300 * (32 + 64) * 4 + 300 * 4 + (32 + 64) * 128 * 4


def test_calibration_mismatches_are_clear_errors(model, xkv_calibration):
    with pytest.raises(KVFoldError, match="groups of 4 layers"):
        kvfold.make_cache(model, f"xkv:layers=2,calib={xkv_calibration}")
    with pytest.raises(KVFoldError, match="fitted on model 'tiny-llama-4'"):
        kvfold.make_cache(make_tiny_llama(layers=3), f"xkv:calib={xkv_calibration}")
    with pytest.raises(KVFoldError, match="written for 'xkv:1.0,value=1.0', not rotate:oscar"):
        kvfold.make_cache(model, f"rotate:oscar,calib={xkv_calibration}+kivi:4")
