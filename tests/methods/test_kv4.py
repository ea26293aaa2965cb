"""KV4 with SmoothAttention: per-token codes within half a step (times λ), smoothing beats plain per-token keys on
outlier channels, alpha=0 is plain per-token KV4, exact bytes, and logits close to full precision."""

import math

import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.methods.kv4 import KV4

from ..conftest import make_tiny_llama
from .helpers import next_token_cosines, run_spec


def roundtrip(quantizer, keys, values):
    fields = quantizer.encode(keys, values)
    k, v = quantizer.decode({n: t.unsqueeze(0) for n, t in fields.items()})
    return fields, k[0].view_as(keys), v[0].view_as(values)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_restores_within_half_a_step(bits):
    torch.manual_seed(0)
    keys, values = torch.randn(5, 16, 32) * 2, torch.randn(5, 16, 32)
    fields, k, v = roundtrip(KV4(bits=bits, group=16), keys, values)
    k_step = fields["k_scale"].float().unsqueeze(-1) * fields["k_smooth"].float().unsqueeze(1)
    assert ((k - keys).abs() <= k_step / 2 + 1e-2 * k_step.amax()).all()
    assert ((v - values).abs() <= fields["v_scale"].float().unsqueeze(-1) / 2 + 1e-2).all()


def test_smoothing_beats_plain_per_token_keys_on_outlier_channels():
    torch.manual_seed(0)
    keys = torch.randn(8, 64, 64)
    keys[..., 5] = keys[..., 5] * 30 + 40  # a large, shifted outlier channel, as in post-RoPE keys
    queries = torch.randn(8, 4, 64)
    errors = {}
    for alpha in (0.0, 0.5):
        _, k, _ = roundtrip(KV4(bits=4, alpha=alpha), keys, keys)
        logits_error = (queries @ (k - keys).transpose(-1, -2)).pow(2).mean()
        errors[alpha] = (logits_error, (k - keys)[..., [c for c in range(64) if c != 5]].pow(2).mean())
    assert errors[0.5][0] < 0.5 * errors[0.0][0]  # attention logits: what the keys are for
    assert errors[0.5][1] < 0.2 * errors[0.0][1]  # the ordinary channels no longer share the outlier's grid


def test_alpha_zero_is_plain_per_token_quantization():
    torch.manual_seed(0)
    keys = torch.randn(3, 16, 32)
    fields, k, _ = roundtrip(KV4(alpha=0, group=16), keys, keys)
    assert (fields["k_smooth"] == 1).all()
    lo, hi = keys.amin(-1, keepdim=True), keys.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).half().float()
    assert ((k - keys).abs() <= step / 2 + 1e-3).all()


def test_nbytes_matches_the_formula(tiny_llama):
    bits, group, residual, tail_page, dim, rows, tokens = 4, 32, 64, 16, 16, 2, 300
    torch.manual_seed(0)
    cache = run_spec(tiny_llama, f"kv4:{bits},group={group},residual={residual}", torch.randint(1, 256, (1, tokens)))
    packed_pages = -(-(tokens - residual) // group)
    tail = tokens - packed_pages * group
    tail_pages = math.ceil(tail / tail_page)
    packed_page = 2 * group * dim * bits // 8 + 4 * group * 2 + dim * 2 + group * 4  # codes, s/z per token, λ, pos
    full_page = tail_page * (2 * dim * 2 + 4)
    per_layer = rows * (packed_pages * (packed_page + 4) + tail_pages * (full_page + 4)) \
        + rows * (packed_pages + 1) * 8 + rows * (tail_pages + 1) * 8
    assert cache.nbytes() == per_layer * len(cache.layers)


@pytest.mark.parametrize("bits, min_cosine", [(8, 0.99999), (4, 0.999)])
def test_logits_stay_close_to_full_precision(bits, min_cosine):
    spec = f"kv4:{bits},group=16,residual=16"
    assert next_token_cosines([spec])[spec] >= min_cosine


@pytest.mark.parametrize("spec, message", [("kv4:3", "bits must be 2, 4 or 8"), ("kv4:4,alpha=2", "alpha must be")])
def test_bad_knobs_are_clear_errors(spec, message):
    with pytest.raises(KVFoldError, match=message):
        kvfold.make_cache(make_tiny_llama(), spec)
