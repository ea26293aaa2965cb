"""The Triton decode kernel equals the reference paged attention (TRITON_INTERPRET=1 on the CPU in CI)."""

import importlib.util
import os

import pytest
import torch

from kvfold.layer import KVFoldLayer
from kvfold.compressor import Compressor
from kvfold.kernels.reference import paged_attention

from ..conftest import make_tiny_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# CPU under TRITON_INTERPRET=1 (CI); the GPU when run there with TRITON_INTERPRET=0.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"


def filled_layer(spec, batch, kv_heads, dim, tokens, page_size=64, window=None, seed=0, dtype=torch.float32,
                 value_std=1.0):
    """A layer store with ragged rows: random K/V, each row keeping a random subset (some rows empty or 1 token)."""
    torch.manual_seed(seed)
    layer = KVFoldLayer(Compressor.parse(spec), sliding_window=window, page_size=page_size)
    keys = torch.randn(batch, kv_heads, tokens, dim, dtype=dtype, device=DEVICE)
    values = (torch.randn(batch, kv_heads, tokens, dim, device=DEVICE) * value_std).to(dtype)
    layer.lazy_initialization(keys, values)
    layer.seen = tokens
    keep = (torch.rand(batch, kv_heads, tokens) < torch.rand(batch, kv_heads, 1)).to(DEVICE)
    keep[0, 0] = False  # an empty row
    if kv_heads > 1:
        keep[0, 1] = False
        keep[0, 1, tokens // 2] = True  # a one-token row
    layer._append_rows(keys, values, torch.arange(tokens, device=DEVICE), keep)
    return layer


@pytest.mark.parametrize("spec, page_size", [("none", 16), ("none", 64), ("kivi:8,group=16,residual=16", 64),
                                             ("kivi:4,group=16,residual=32", 64), ("kivi:2,group=32,residual=16", 64),
                                             ("fp8", 64), ("fp8:e5m2,scale=page,group=32,residual=16", 64),
                                             ("rotate+kivi:4,group=16,residual=16", 64), ("rotate:random+fp8", 64),
                                             ("kv4:4,group=16,residual=16", 64), ("kv4:2,group=32,residual=16", 64),
                                             ("kivi:4,group=16,residual=16,sink=5", 64),
                                             ("rotate+kv4:8,group=16,residual=16", 64)])
@pytest.mark.parametrize("dim, group", [(16, 1), (32, 4), (64, 8)])
@pytest.mark.parametrize("window", [None, 23])
def test_kernel_matches_reference(spec, page_size, dim, group, window):
    from kvfold.kernels.decode import paged_decode, supports

    batch, kv_heads, tokens = 2, 2, 150
    layer = filled_layer(spec, batch, kv_heads, dim, tokens, page_size, window)
    if DEVICE == "cuda" and not supports(layer.kernel_parts(), dim):
        pytest.skip("Triton's dot needs >= 16 tokens per page and head_dim on a GPU (the layer reads the reference)")
    rows = batch * kv_heads
    query = torch.randn(rows, group, dim, device=DEVICE)
    q_pos = tokens - 1
    expected = paged_attention(query, torch.full((group,), q_pos, device=DEVICE), layer.chunks(), 0.125, window)
    got = paged_decode(query, layer.kernel_parts(), q_pos, 0.125, window, pages_per_split=2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # the empty row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_reads_half_precision_pages(dtype):
    from kvfold.kernels.decode import paged_decode

    layer = filled_layer("none", 1, 2, 32, 90, 16, dtype=dtype)
    query = torch.randn(2, 3, 32, device=DEVICE)
    expected = paged_attention(query, torch.full((3,), 89, device=DEVICE), layer.chunks(), 0.2)
    torch.testing.assert_close(paged_decode(query, layer.kernel_parts(), 89, 0.2), expected, rtol=1e-4, atol=1e-5)


def test_model_decodes_the_same_through_the_kernel(monkeypatch, merge_in_pytorch):
    import kvfold

    tiny_llama = make_tiny_llama().to(DEVICE)
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (2, 80)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    outputs = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("KVFOLD_KERNELS", mode)
        with kvfold.compress(tiny_llama, "snapkv:0.5+kivi:4,group=16,residual=16"):
            outputs[mode] = tiny_llama.generate(ids, attention_mask=mask, **settings)
    # same logits step by step while the tokens agree (a top-2 gap below float32 noise may flip a token)
    for step, (ref, ker) in enumerate(zip(outputs["reference"].scores, outputs["triton"].scores)):
        torch.testing.assert_close(ker, ref, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        if not torch.equal(ref.argmax(-1), ker.argmax(-1)):
            gap = ref.topk(2).values.diff().abs().min()
            assert gap < 1e-4, f"tokens differ at step {step} with a top-2 gap of {gap}"
            break


def test_unsupported_shapes_fall_back_to_the_reference():
    from kvfold.kernels.decode import supports

    assert supports(filled_layer("kivi:2,group=16,residual=16", 1, 2, 64, 40).kernel_parts(), 64)
    assert not supports(filled_layer("none", 1, 2, 8, 40, page_size=16).kernel_parts(), 8)
    assert not supports(filled_layer("none", 1, 2, 32, 40, page_size=8).kernel_parts(), 32)


@pytest.mark.parametrize("splits", [1, 3, 16, 40])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_split_merge_kernel_matches_its_reference(splits, out_dtype):
    """The one-kernel split merge equals the PyTorch merge, including splits that saw no key and a row that saw
    none (zeros), over more splits than one block of the kernel holds (40 > 16)."""
    from kvfold.kernels.decode import combine, combine_reference

    torch.manual_seed(splits)
    rows, group, dim = 3, 4, 64
    m = torch.randn(rows, splits, group, device=DEVICE) * 4
    l = torch.rand(rows, splits, group, device=DEVICE) * 5 + 0.1
    acc = torch.randn(rows, splits, group, dim, device=DEVICE) * l.unsqueeze(-1)
    m[0] = float("-inf")  # a row that saw no key
    l[0], acc[0] = 0.0, 0.0
    if splits > 1:
        m[1, 1:] = float("-inf")  # splits past a short row's end
        l[1, 1:], acc[1, 1:] = 0.0, 0.0
    got = combine(m, l, acc, out_dtype)
    expected = combine_reference(m, l, acc)
    assert got.dtype == out_dtype and torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got.float(), expected, rtol=1e-3 if out_dtype == torch.float16 else 1e-5,
                               atol=1e-3 if out_dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_kernel_token_write_matches_write_next(dtype, per_row):
    """The fast loop's token write (`write_tokens`) stores what `PagedRows.write_next` stores, at each row's own
    slot (rows at different lengths, one ending on a page boundary), and counts the token. The position is one
    for every row, or one per row (a joint step of requests at different lengths)."""
    from kvfold.kernels.decode import write_tokens

    layer = filled_layer("none", 2, 2, 64, 50, page_size=16, dtype=dtype)
    store = layer.full
    store.reserve_tokens(3)
    rows = store.rows
    torch.manual_seed(1)
    for step in range(3):
        keys = torch.randn(rows, 64, dtype=dtype, device=DEVICE)
        values = torch.randn(rows, 64, dtype=dtype, device=DEVICE)
        position = (torch.arange(rows, dtype=torch.int32, device=DEVICE) * 7 + 50 + step if per_row
                    else torch.tensor([50 + step], dtype=torch.int32, device=DEVICE))
        table, lengths = store.table.to(DEVICE, torch.int32).contiguous(), store.lengths.to(DEVICE, torch.int32)
        before = {name: t.clone() for name, t in store.pool.tensors.items()}
        write_tokens(store.pool.tensors, table, lengths, keys, values, position)
        by_kernel = {name: t.clone() for name, t in store.pool.tensors.items()}
        store.pool.tensors.update({name: t.clone() for name, t in before.items()})
        store.write_next({"k": keys, "v": values, "pos": position.expand(rows)}, store.table, store.lengths)
        assert not per_row or len(set(store.pool.tensors["pos"][by_kernel["pos"] != before["pos"]].tolist())) == rows
        assert torch.equal(lengths.cpu().long(), store.lengths)
        for name, tensor in store.pool.tensors.items():
            assert torch.equal(by_kernel[name], tensor), name


@pytest.mark.parametrize("spec", ["none", "kivi:4,group=16,residual=32", "kivi:2,group=32,residual=16", "fp8",
                                  "kv4:4,group=16,residual=16", "rotate+kivi:4,group=16,residual=16"])
@pytest.mark.parametrize("n, group", [(2, 1), (3, 4), (5, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_few_new_tokens_read_the_store_through_the_kernel(spec, n, group, dtype, monkeypatch):
    """A turn of a few tokens (a speculative draft being verified) reads the store through the decode kernel, with
    its own tokens (causal; one padded out) merged in as one more split: the reference's attention, within float32
    noise for float32 queries and float16 rounding for float16 ones (the 16-bit kernels). Row 0 holds nothing, so
    its first query sees no key at all (zeros)."""
    from kvfold.kernels import decode
    from kvfold.kernels.reference import KVChunk

    batch, kv_heads, dim, tokens = 2, 2, 32, 150
    layer = filled_layer(spec, batch, kv_heads, dim, tokens, dtype=dtype)  # pages in the model's dtype, as in use
    rows = batch * kv_heads
    torch.manual_seed(n * group)
    query = torch.randn(batch, kv_heads * group, n, dim, device=DEVICE).to(dtype)
    positions = torch.arange(tokens, tokens + n, device=DEVICE)
    valid = torch.ones(rows, n, dtype=torch.bool, device=DEVICE)
    valid[0, 0] = False
    new = KVChunk(torch.randn(rows, n, dim, device=DEVICE), torch.randn(rows, n, dim, device=DEVICE),
                  positions.expand(rows, n), valid)
    calls, kernel = [], decode.paged_decode
    monkeypatch.setattr(decode, "paged_decode", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setenv("KVFOLD_KERNELS", "triton")
    got = layer.attend(query, positions, 0.125, new=new)
    monkeypatch.setenv("KVFOLD_KERNELS", "reference")
    expected = layer.attend(query.float(), positions, 0.125, new=new)
    assert calls == [1] and got.dtype == dtype and got.shape == (batch, n, kv_heads * group, dim)
    assert torch.equal(got[0, 0, :group], torch.zeros_like(got[0, 0, :group]))
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    else:
        assert ((got.float() - expected).norm() / expected.norm()).item() < 2e-3


def test_a_short_turn_on_a_filled_cache_goes_through_the_kernel(monkeypatch, merge_in_pytorch):
    """A model's three-token turn after a prefill (kivi:4 pages and a full-precision tail) gives the reference's
    logits through the kernel."""
    from kvfold.api import make_cache, prefill, use_kvfold_attention
    from kvfold.kernels import decode

    model = make_tiny_llama().to(DEVICE)
    ids = torch.randint(1, 256, (2, 70), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    calls, kernel = [], decode.paged_decode
    monkeypatch.setattr(decode, "paged_decode", lambda *a, **k: calls.append(k.get("also") is not None) or kernel(*a, **k))
    logits = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("KVFOLD_KERNELS", mode)
        with torch.inference_mode(), use_kvfold_attention(model):
            cache = make_cache(model, "kivi:4,group=16,residual=16")
            prefill(model, cache, ids[:, :67])
            logits[mode] = prefill(model, cache, ids[:, 67:], start=67)
    assert calls == [True] * len(model.model.layers)  # the turn, in every layer, through the kernel
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec, dtype", [("none", torch.float32), ("kivi:4,group=16,residual=16,sink=5", torch.float16)])
def test_a_batch_invariant_read_gives_each_row_the_same_bits_in_any_batch(spec, dtype, monkeypatch):
    """`paged_decode(batch_invariant=True)` (a server's joint step): a row's output is bit for bit the same read
    alone, beside rows that are longer (wider tables, more splits in every part) or in another order. Splits of
    64 tokens here, so that short rows have several (and the parts after the first start at other offsets)."""
    import dataclasses

    from kvfold.kernels import decode
    from kvfold.kernels.decode import paged_decode

    monkeypatch.setattr(decode, "INVARIANT_SPLIT_TOKENS", 64)
    layer = filled_layer(spec, 3, 2, 64, 300, page_size=16, dtype=dtype, seed=3)
    rows = 6
    torch.manual_seed(4)
    query = torch.randn(rows, 4, 64, device=DEVICE).to(dtype)

    def read(subset: list[int]) -> torch.Tensor:
        index = torch.tensor(subset, device=DEVICE)
        parts = []
        for part in layer.kernel_parts():
            table, lengths = part.table[index], part.lengths[index]
            used = int((table >= 0).sum(1).max()) if table.numel() else 0
            parts.append(dataclasses.replace(part, table=table[:, :max(1, used)].contiguous(), lengths=lengths))
        return paged_decode(query[index], parts, 299, 0.125, out_dtype=dtype, batch_invariant=True)

    together = read(list(range(rows)))
    lengths = layer.row_lengths().flatten()
    short = int(lengths[lengths > 0].argmin())
    for subset in ([short], [short, 5], [5, short, 2]):
        alone = read(subset)
        assert torch.equal(alone[subset.index(short)], together[short])
    expected = paged_attention(query.float(), torch.full((4,), 299, device=DEVICE), layer.chunks(), 0.125)
    torch.testing.assert_close(together.float(), expected, rtol=2e-3 if dtype == torch.float16 else 1e-4,
                               atol=2e-3 if dtype == torch.float16 else 1e-5)


def test_splits_are_sized_by_the_pages_the_rows_hold():
    """`split_pages`: the pages all rows hold make about 4 busy programs per multiprocessor (8 of one warp), so
    ragged rows (per-head budgets) get smaller splits than the longest row alone would give; rows of equal length
    get what a width-based split gives. Kernel parts carry the pages their rows hold."""
    from kvfold.kernels.decode import split_pages

    rows, width, sms = 64, 512, 132
    assert split_pages(rows * width, 4, sms) == 64  # 64 rows x 512 pages over 528 programs
    assert split_pages(rows * width, 1, sms) == 32  # one-warp programs: 8 per multiprocessor
    assert split_pages(rows * width // 4, 4, sms) == 16  # a quarter of the pages held: a quarter of the split
    assert split_pages(0, 4, sms) == 1 and split_pages(3, 4, sms) == 1
    layer = filled_layer("kivi:4,group=16,residual=16", 2, 2, 32, 150, 16)
    for part, (_, stored) in zip(layer.kernel_parts(), layer.stores()):
        assert part.pages_used == int(stored.pages_per_row().sum()) > 0
