"""ZipCache: mixed-precision pages (salient slots at high bits), channel-separable token-wise values, normalized
attention from probe queries, exact bytes, and a model that still answers close to full precision."""

import math

import pytest
import torch

import kvfold
from kvfold.errors import KVFoldError
from kvfold.kernels.reference import dequantize, quantize
from kvfold.methods.base import ScoreInputs
from kvfold.methods.kivi import KIVI
from kvfold.methods.zipcache import ZipCache

from ..conftest import make_tiny_llama
from .helpers import eager_attentions, next_token_cosines, run_spec


@pytest.mark.parametrize("bits, low", [(4, 2), (8, 2), (8, 4)])
def test_decode_restores_each_slot_within_half_its_step(bits, low):
    quantizer = ZipCache(bits=bits, low=low, group=16)
    torch.manual_seed(0)
    keys, values = torch.randn(5, 16, 32) * 2, torch.randn(5, 16, 32)
    fields = quantizer.encode(keys, values)
    k, v = (x[0].view(5, 16, 32) for x in quantizer.decode({n: t.unsqueeze(0) for n, t in fields.items()}))
    high = quantizer.high_slots
    k_step = torch.cat([fields["k_high_scale"].float().unsqueeze(1).expand(5, high, 32),
                        fields["k_low_scale"].float().unsqueeze(1).expand(5, 16 - high, 32)], dim=1)
    v_step = fields["v_scale"].float().unsqueeze(-1) * fields["v_channel"].float().unsqueeze(1)
    assert ((k - keys).abs() <= k_step / 2 + 1e-2).all()
    assert ((v - values).abs() <= v_step / 2 + 1e-2).all()
    # the high slots really are finer: their mean error is well below the low slots'
    error = (k - keys).abs().mean(dim=(0, 2))
    assert error[:high].mean() < 0.5 * error[high:].mean()


def test_channel_separable_values_beat_plain_token_wise_on_outlier_channels():
    torch.manual_seed(0)
    values = torch.randn(8, 64, 64)
    values[..., 3] *= 40  # an outlier channel swamps every token's min-max grid
    values[..., 17] *= 25
    quantizer = ZipCache(bits=4, low=2, group=64, salient=0.5)
    _, v = quantizer.decode({n: t.unsqueeze(0) for n, t in quantizer.encode(values, values).items()})
    mixed_error = (v[0].view_as(values) - values).pow(2)
    plain = [quantize(values[:, :32], 4, (-1,)), quantize(values[:, 32:], 2, (-1,))]
    plain_v = torch.cat([dequantize(plain[0], 4, lambda s: s.unsqueeze(-1)),
                         dequantize(plain[1], 2, lambda s: s.unsqueeze(-1))], dim=1)
    plain_error = (plain_v - values).pow(2)
    normal = [c for c in range(64) if c not in (3, 17)]
    assert mixed_error[..., normal].mean() < 0.25 * plain_error[..., normal].mean()


def test_saliency_with_every_query_is_the_normalized_attention_score():
    torch.manual_seed(0)
    batch, q_heads, kv_heads, n, dim = 2, 4, 2, 40, 16
    queries, keys = torch.randn(batch, q_heads, n, dim), torch.randn(batch, kv_heads, n, dim)
    positions = torch.arange(n).view(1, 1, n).expand(batch, kv_heads, n)
    valid = torch.ones(batch, kv_heads, n, dtype=torch.bool)
    got = ZipCache(probe=1.0).saliency(ScoreInputs(queries, torch.arange(n), keys, keys, positions, valid, 0.25))
    logits = queries.view(batch, kv_heads, 2, n, dim) @ keys.unsqueeze(2).transpose(-1, -2) * 0.25
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    expected = attn.sum(dim=(2, 3)) / (2 * (n - torch.arange(n)))  # each key is seen by the n - i later queries
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_probes_are_half_newest_half_seeded_random():
    quantizer = ZipCache(probe=0.1)
    picked = quantizer.probe_indices(1000)
    assert len(picked) == 100 and picked.unique().numel() == 100
    assert set(range(950, 1000)) <= set(picked.tolist())
    assert (picked[:50] < 950).all() and torch.equal(picked, quantizer.probe_indices(1000))
    assert quantizer.probe_indices(3).tolist() == [2]


def test_prefill_puts_the_most_salient_tokens_in_the_high_slots():
    model = make_tiny_llama(init=0.02)
    torch.manual_seed(2)
    ids, n = torch.randint(1, 256, (1, 200)), 200
    cache = run_spec(model, "zipcache:4,group=16,residual=16,probe=1", ids)
    attentions = eager_attentions(model, ids)
    packed_span, high = 192, ZipCache(group=16).high_slots  # 12 whole pages leave 8 tokens in the tail
    for layer, attn in zip(cache.layers, attentions):
        reference = attn.view(1, 2, 2, n, n).sum(dim=(2, 3)) / (2 * (n - torch.arange(n)))
        pages = layer.packed.table[:, :12].to(layer.device)
        slots = layer.packed.pool.tensors["pos"][pages].long()  # [rows, 12, 16]
        for row in range(2):
            assert sorted(slots[row].flatten().tolist()) == list(range(packed_span))
            chosen = set(slots[row, :, :high].flatten().tolist())
            best = reference[0, row, :packed_span].topk(12 * high).indices.tolist()
            assert len(chosen & set(best)) >= 12 * high - 2  # float32 near-ties may swap a pair at the border


def test_decoding_packs_ranked_pages_and_loses_no_token(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 100))
    with kvfold.compress(tiny_llama, "zipcache:4,group=16,residual=32") as session:
        tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                            pad_token_id=0)
    for layer in session.cache.layers:
        assert (layer.packed.lengths % 16 == 0).all() and (layer.full.lengths + layer.packed.lengths == 139).all()
        assert all(torch.equal(p.long(), torch.arange(139)) for p in layer.kept_positions()[0])


def test_order_page_puts_the_attended_tokens_first():
    quantizer = ZipCache(group=8, salient=0.5)
    keys = torch.randn(1, 8, 16) * 0.1
    keys[0, [1, 4, 6, 7]] += 3 * torch.ones(16)  # the query below attends these four
    order = quantizer.order_page(torch.ones(1, 3, 16), keys, 1.0)
    assert order[0, :4].tolist() == [1, 4, 6, 7] and order[0, 4:].tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("tokens", [300, 317])
def test_nbytes_matches_the_formula(tiny_llama, tokens):
    bits, low, group, residual, tail_page, dim, rows = 4, 2, 32, 64, 16, 16, 2
    torch.manual_seed(0)
    cache = run_spec(tiny_llama, f"zipcache:{bits},low={low},group={group},residual={residual}",
                     torch.randint(1, 256, (1, tokens)))
    high = round(group * 0.6)
    packed_pages = -(-(tokens - residual) // group)
    tail = tokens - packed_pages * group
    tail_pages = math.ceil(tail / tail_page)
    packed_page = (2 * (high * dim * bits // 8 + (group - high) * dim * low // 8)  # K and V codes
                   + 5 * dim * 2 + 2 * group * 2 + group * 4)  # k s/z twice, v channel, v s/z per token, pos
    full_page = tail_page * (2 * dim * 2 + 4)
    remembered = 4 * 32 * dim * 4 + 32 * 8  # the newest 32 float32 queries of every head, int64 positions
    per_layer = rows * (packed_pages * (packed_page + 4) + tail_pages * (full_page + 4)) \
        + rows * (packed_pages + 1) * 8 + rows * (tail_pages + 1) * 8 + remembered
    assert cache.layers[0].full.lengths.tolist() == [tail] * rows
    assert cache.nbytes() == per_layer * len(cache.layers)


def test_logits_sit_between_kivi_2_and_kivi_4():
    cosine = next_token_cosines(["zipcache:4,group=16,residual=16", "kivi:2,group=16,residual=16"])
    assert cosine["zipcache:4,group=16,residual=16"] >= 0.999
    assert cosine["zipcache:4,group=16,residual=16"] > cosine["kivi:2,group=16,residual=16"]


def test_composes_with_eviction_and_a_sliding_window():
    """Pages that mix positions slide out only when all their tokens left the window: the tokens inside it that
    the eviction kept are all still held (the same as without the quantizer)."""
    from ..tiny_models import SLIDING_WINDOW, tiny_model

    model = tiny_model("mistral")
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 300))
    mixed = run_spec(model, "snapkv:0.5,window=8+zipcache:4,group=16,residual=16", ids, steps=20)
    plain = run_spec(model, "snapkv:0.5,window=8", ids, steps=20)
    oldest_needed = 320 - SLIDING_WINDOW
    for layer, reference in zip(mixed.layers, plain.layers):
        assert layer.packed.lengths.sum() > 0
        for got, want in zip(layer.kept_positions()[0], reference.kept_positions()[0]):
            assert torch.equal(got[got >= oldest_needed], want[want >= oldest_needed])
            assert got.numel() < 300 // 2 + 20


@pytest.mark.parametrize("spec, message", [
    ("zipcache:2", "bits .* must be 4 or 8"), ("zipcache:4,low=4", "below bits=4"),
    ("zipcache:4,salient=1.0", r"salient must be in \(0, 1\)"), ("zipcache:4,probe=0", r"probe must be in \(0, 1\]"),
    ("zipcache:4,group=2,salient=0.2", "high-precision slots"),
])
def test_bad_knobs_are_clear_errors(spec, message):
    with pytest.raises(KVFoldError, match=message):
        kvfold.make_cache(make_tiny_llama(), spec)


def test_kivi_bytes_are_not_the_same_layout():
    """The mixed page is smaller than kivi:4's and larger than kivi:2's for the same group (head_dim 64)."""
    size = lambda q: sum(math.prod(f.shape) * f.dtype.itemsize for f in q.fields(64).values())  # noqa: E731
    assert size(KIVI(bits=2)) < size(ZipCache()) < size(KIVI(bits=4))


def test_ragged_batches_through_the_fast_loop_match_the_normal_path(tiny_llama):
    """Left-padded prompts of different lengths: the fast loop (pages written in place, decoded pages ranked by the
    remembered queries at each packing tick) gives the normal path's tokens and holds the same bytes."""
    from kvfold.decoding import generate_batch

    prompts = [list(range(3, 120)), list(range(9, 60))]
    slow = generate_batch(tiny_llama, prompts, method="zipcache:4,group=16,residual=16", max_new_tokens=24,
                          fast=False)
    fast = generate_batch(tiny_llama, prompts, method="zipcache:4,group=16,residual=16", max_new_tokens=24)
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in slow.outputs]
    assert fast.kv_bytes == slow.kv_bytes
