"""The 16-bit-query kernels (`kernels.fast_decode`: 16-bit and float8 pages; `kernels.packed_decode`: KIVI and KV4
pages, float8 pages as columns) equal the reference paged attention within 16-bit rounding.

On the CPU (TRITON_INTERPRET=1) float16 only: the interpreter's bfloat16 arithmetic is not faithful, so bfloat16
runs where the GPU is (TRITON_INTERPRET=0 on a CUDA machine).
"""

import importlib.util

import pytest
import torch

from kvfold.kernels.reference import paged_attention

from .test_decode import DEVICE, filled_layer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# relative error of the output: float16 dot products round operands to 11 bits, bfloat16 to 8
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def decode_case(spec, tokens, dim, group, page, window=None, dtype=torch.float16, query_dtype=None):
    """A layer of 2 x 2 ragged rows (`filled_layer`: the first row empty), a query [4, group, dim] for the last
    position, and the reference's output for it."""
    layer = filled_layer(spec, 2, 2, dim, tokens, page, window, dtype=dtype)
    query = (torch.randn(4, group, dim, device=DEVICE) * 2).to(query_dtype or dtype)
    expected = paged_attention(query.float(), torch.full((group,), tokens - 1, device=DEVICE), layer.chunks(),
                               dim ** -0.5, window)
    return layer, query, expected


def assert_near(got, expected, bound=BOUND[torch.float16], what=""):
    """The empty row stays zeros; the output is within `bound` relative error of the reference."""
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # the empty row
    err = ((got - expected).norm() / expected.norm()).item()
    assert err < bound, f"relative error {err:.2e} {what}"


@pytest.mark.parametrize("spec", ["none", "kivi:8,group=16,residual=16", "kivi:4,group=16,residual=32",
                                  "kivi:2,group=32,residual=16", "kivi:4,group=64,residual=64",
                                  "rotate+kivi:4,group=16,residual=16", "kivi:2,group=16,residual=16,sink=5",
                                  "fp8", "fp8:e5m2,scale=page,group=32,residual=16", "kv4:4,group=16,residual=16",
                                  "kv4:2,group=32,residual=16", "rotate+kv4:8,group=16,residual=16"])
@pytest.mark.parametrize("dim, group", [(32, 1), (64, 4), (128, 3)])
@pytest.mark.parametrize("window", [None, 23])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_kernels_match_reference(spec, dim, group, window, dtype):
    from kvfold.kernels.decode import fast_kind, paged_decode

    tokens = 150
    layer, query, expected = decode_case(spec, tokens, dim, group, 64 if spec == "none" else 16, window, dtype)
    parts = layer.kernel_parts()
    kinds = {fast_kind(part, dim, torch.device(DEVICE)) for part in parts}
    assert kinds & {"full", "packed"}, "no part went to a fast kernel: the test would not test them"
    got = paged_decode(query, parts, tokens - 1, dim ** -0.5, window, pages_per_split=2)
    # a part too narrow for the fast kernel's dot products on a GPU goes to the general kernel: bfloat16 dots
    assert_near(got, expected, BOUND[dtype] if kinds <= {"full", "packed"} else BOUND[torch.bfloat16])


@pytest.mark.parametrize("spec", ["none", "fp8:group=16", "fp8:scale=page,group=16"])
@pytest.mark.parametrize("tile_tokens, pages_per_split", [(64, 4), (64, 8), (32, 2), (64, 6), (0, 4)])
@pytest.mark.parametrize("window", [None, 23])
def test_small_pages_read_several_per_step_match_reference(spec, tile_tokens, pages_per_split, window):
    """16-token pages read `tile_tokens` at a time (several pages per step; rows end mid-tile and mid-page; a split
    of pages that the tile does not divide reads fewer pages per step)."""
    from kvfold.kernels.decode import paged_decode

    tokens, dim, group = 170, 64, 4
    layer, query, expected = decode_case(spec, tokens, dim, group, 16, window)
    parts = layer.kernel_parts()
    assert {part.positions.shape[1] for part in parts} == {16}
    got = paged_decode(query, parts, tokens - 1, dim ** -0.5, window, pages_per_split=pages_per_split,
                       tile_tokens=tile_tokens)
    assert_near(got, expected)


@pytest.mark.parametrize("spec", ["kivi:8,group=16,residual=16", "kivi:4,group=64,residual=16",
                                  "kivi:2,group=32,residual=16", "kv4:4,group=16,residual=16",
                                  "rotate+kivi:4,group=16,residual=16"])
def test_value_offsets_taken_off_per_row_match_reference(spec):
    """FOLD (the default): value codes keep their float16 offset, taken off once per row of each dot product; the
    same bound as taking it off each code (FOLD=False). KEY_FOLD (the columns kernel's default): KIVI's key codes
    too, their offset taken off with the page's q·z."""
    from kvfold.kernels.decode import PACKED_LAUNCH, paged_decode

    tokens, dim, group = 170, 64, 4
    layer, query, expected = decode_case(spec, tokens, dim, group, 16)
    for fold in (True, False):
        for columns, key_fold in ((0, False), (1, False), (1, True)):
            got = paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, pages_per_split=2,
                               launch={**PACKED_LAUNCH, "FOLD": fold, "COLUMNS": columns, "KEY_FOLD": key_fold})
            assert_near(got, expected, what=f"(FOLD={fold}, columns {columns})")


@pytest.mark.parametrize("spec, window", [("kivi:4,group=16,residual=16", None), ("kivi:2,group=32,residual=16", 23),
                                          ("kv4:4,group=16,residual=16", None), ("kv4:2,group=32,residual=16", 23),
                                          ("zipcache:group=32,residual=16", None)])
@pytest.mark.parametrize("columns", [0, 1])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_both_packed_kernels_match_reference(spec, window, columns, group):
    """`kivi_pages_kernel` (queries as the tile's rows) and `kivi_columns_kernel` (as its columns; the key scales
    on the query) read the same pages alike, whatever `paged_decode` picks for the group. Splits of 1, 2 and 3
    pages: rows end mid-split and mid-page."""
    from kvfold.kernels.decode import PACKED_LAUNCH, TALL_PACKED_LAUNCH, paged_decode

    tokens, dim = 170, 64
    layer, query, expected = decode_case(spec, tokens, dim, group, 16, window)
    launch = PACKED_LAUNCH if group < 8 or columns else TALL_PACKED_LAUNCH
    for pages_per_split in (1, 2, 3):
        got = paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window,
                           pages_per_split=pages_per_split, launch={**launch, "COLUMNS": columns})
        assert_near(got, expected, what=f"({pages_per_split} pages a split)")


@pytest.mark.parametrize("spec, dim, window", [
    ("kivi:4,group=16,residual=16", 64, None), ("kivi:2,group=16,residual=16", 64, 23),
    ("kivi:4,group=64,residual=16", 128, 23), ("kivi:2,group=64,residual=16", 128, None),
    ("kivi:8,group=32,residual=16", 128, 23)])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_value_groups_as_rows_match_queries_repeated_per_group(spec, dim, window, group):
    """GROUP_ROWS (the packed columns kernel with the queries alone as columns, each value group its own rows of
    the output and its own dot product) reads what repeating the queries once per value group reads: 2 and 4 value
    groups, GQA 1/3/8 (8 × 4 groups: 32 pairs, past `COLUMNS_UP_TO`, 8 columns here), value zeros tied to the dot
    or not (ASYNC_SCALES 3 / 0), splits of 1-3 pages (rows ending mid-split and mid-page), a sliding window. On a
    GPU a group's dot needs 16 words of codes (head_dim 128, groups of 32-64 channels)."""
    from kvfold.kernels.decode import paged_decode

    if DEVICE == "cuda" and dim < 128:
        pytest.skip("a value group of under 16 words: GROUP_ROWS refuses it on a GPU")
    tokens = 170
    layer, query, expected = decode_case(spec, tokens, dim, group, 16, window)
    for pages_per_split in (1, 2, 3):
        for scales in (0, 3):
            launch = {"num_warps": 1, "num_stages": 3, "COLUMNS": 1, "ASYNC_SCALES": scales}
            repeated, as_rows = (paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window,
                                              pages_per_split=pages_per_split, launch={**launch, "GROUP_ROWS": rows})
                                 for rows in (0, 1))
            what = f"({pages_per_split} pages a split, ASYNC_SCALES {scales})"
            assert_near(as_rows, expected, what=what)
            # the same float16 weights and codes; the dots' float32 sums differ in order, and FOLD's offset (up to
            # 1024 a code, taken off after the sum; on a GPU inside the tensor cores' accumulation) makes that a few
            # units in the last place of 1024: within the fast kernels' bound of each other (H200, 1500 tokens,
            # GQA 3/8: each 2.6e-4 to 5.4e-4 from the reference, GROUP_ROWS never further than the repeated layout)
            assert_near(as_rows, repeated, what=f"from the repeated layout {what}")


@pytest.mark.parametrize("spec", ["fp8", "fp8:e5m2,scale=page,group=32,residual=16", "fp8:scale=page,group=16"])
@pytest.mark.parametrize("window", [None, 23])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_float8_pages_read_as_columns_match_reference(spec, window, group):
    """`float8_columns_kernel` (`launch={"COLUMNS": 1}`): float8 pages read as 16-bit words of two codes, the queries
    as the tiles' columns; splits of 1 and 3 pages, rows ending mid-page, the empty row."""
    from kvfold.kernels.decode import paged_decode

    tokens, dim = 150, 64
    layer, query, expected = decode_case(spec, tokens, dim, group, 16, window)
    for pages_per_split in (1, 3):
        got = paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window,
                           pages_per_split=pages_per_split, launch={"COLUMNS": 1})
        assert_near(got, expected, what=f"({pages_per_split} pages a split)")


@pytest.mark.parametrize("spec", ["kivi:4,group=64,residual=16", "kivi:2,group=32,residual=16",
                                  "kv4:4,group=16,residual=16", "fp8", "fp8:scale=page,group=16"])
def test_scales_copied_ahead_read_as_loaded_one_at_a_time(spec):
    """ASYNC_SCALES (the columns kernels' default): a page's scales and zeros loaded as contiguous blocks (copied
    ahead by the loop's pipeline) give what loading them field by field gives, rows ending mid-page included."""
    from kvfold.kernels.decode import paged_decode

    tokens, dim, group = 150, 64, 4
    layer, query, expected = decode_case(spec, tokens, dim, group, 16)
    outputs = [paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, pages_per_split=2,
                            launch={"num_warps": 1, "num_stages": 3, "COLUMNS": 1, "ASYNC_SCALES": level})
               for level in (0, 1, 2, 3)]
    for level, got in enumerate(outputs):
        assert_near(got, expected, what=f"(ASYNC_SCALES={level})")
        torch.testing.assert_close(got, outputs[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec, window, columns, tile_tokens", [
    ("kivi:4,group=64,residual=16", None, 1, 64), ("kv4:2,group=16,residual=16", 23, 1, 64),
    ("zipcache:group=32,residual=16", None, 1, 64), ("fp8", 23, 1, 64), ("fp8:scale=page,group=16", None, 1, 64),
    ("kivi:2,group=32,residual=16", 23, 0, 64), ("kv4:4,group=16,residual=16", None, 0, 64),
    ("zipcache:group=32,residual=16", None, 0, 64), ("none", 23, 0, 0), ("none", None, 0, 64), ("fp8", None, 0, 64),
    ("fp8:scale=page,group=16", 23, 0, 0)])
def test_page_ids_loaded_ahead_read_as_loaded_page_by_page(spec, window, columns, tile_tokens):
    """PAGE_IDS (the packed columns kernel's default on a GPU; every other fast kernel takes it too): the split's
    page ids loaded as one vector before the page loop give what loading each page's id in its step gives: splits
    of 2 and 4 pages, rows ending mid-split and mid-page, the empty row, a sliding window, ZipCache's mixed pages,
    and 16-bit and float8 pages in `full_pages_kernel` (COLUMNS 0) one page a step (tile_tokens 0) or several (a
    tile's ids spread over its slots)."""
    from kvfold.kernels.decode import paged_decode

    tokens, dim, group = 150, 64, 4
    layer, query, expected = decode_case(spec, tokens, dim, group, 16, window)
    launch = {"num_warps": 1, "num_stages": 3, "COLUMNS": columns}
    for pages_per_split in (2, 4):
        outputs = [paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window,
                                pages_per_split=pages_per_split, tile_tokens=tile_tokens,
                                launch={**launch, "PAGE_IDS": ids})
                   for ids in (0, 1)]
        for ids, got in enumerate(outputs):
            assert_near(got, expected, what=f"(PAGE_IDS={ids}, {pages_per_split} a split)")
        torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec, window", [("kivi:2,group=32,residual=16", 23), ("kv4:2,group=16,residual=16", None),
                                          ("zipcache:group=32,residual=16", None)])
def test_two_bit_codes_read_as_words_read_as_bytes(spec, window):
    """WORDS (the packed columns kernel, head_dim 128): 2-bit codes read as 16-bit words of 8 bit fields give what
    reading them as bytes (4 fields) gives: splits of 1 and 3 pages, rows ending mid-split and mid-page, the empty
    row, a sliding window and ZipCache's mixed pages (their 2-bit part)."""
    from kvfold.kernels.decode import paged_decode

    tokens, dim, group = 110, 128, 4
    layer, query, expected = decode_case(spec, tokens, dim, group, 16, window)
    assert any(part.bits == 2 for part in layer.kernel_parts())
    for pages_per_split in (1, 3):
        outputs = [paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window,
                                pages_per_split=pages_per_split,
                                launch={"num_warps": 1, "num_stages": 3, "COLUMNS": 1, "WORDS": words})
                   for words in (0, 1)]
        for words, got in enumerate(outputs):
            assert_near(got, expected, what=f"(WORDS={words}, {pages_per_split} a split)")
        # the same float16 products; the dots group channels differently, and FOLD's float16 offsets (~1000x a
        # code) make float32 rounding show at ~1e-4 of the output (words against bytes without FOLD: equal)
        apart = ((outputs[1] - outputs[0]).norm() / expected.norm()).item()
        assert apart < 5e-4, f"words and bytes {apart:.2e} apart"


@pytest.mark.parametrize("spec, window", [("fp8", None), ("fp8:scale=page", 23), ("fp8:e5m2", 23),
                                          ("kivi:4,group=64,residual=16", 23), ("kivi:2,group=64,residual=16", None),
                                          ("kv4:4,group=32,residual=16", None), ("kv4:2,group=64,residual=16", 23)])
def test_columns_kernels_read_part_of_a_page_a_step_as_whole_pages(spec, window):
    """STEP (both columns kernels): pages read 16 or 32 tokens a step (below the page's 32 or 64), with and without
    PAGE_IDS, give what reading a page a step gives: splits of 1, 2 and 3 pages, rows ending mid-page and mid-step,
    the empty row, a sliding window; float8 scales per token and per page, KIVI's and KV4's key statistics. The
    steps' softmax and value-scale maxima differ, so the outputs agree to float16 rounding, not bit for bit."""
    from kvfold.kernels.decode import paged_decode

    tokens, dim, group = 150, 64, 4
    layer, query, expected = decode_case(spec, tokens, dim, group, 64, window)
    page = max(part.positions.shape[1] for part in layer.kernel_parts() if part.scaled or part.bits)
    launch = {"num_warps": 1, "num_stages": 3, "COLUMNS": 1}
    for pages_per_split, ids in ((1, 0), (3, 0), (2, 1)):
        whole = paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window,
                             pages_per_split=pages_per_split, launch={**launch, "PAGE_IDS": ids})
        for step in (16, 32)[:2 if page > 32 else 1]:
            got = paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window,
                               pages_per_split=pages_per_split, launch={**launch, "PAGE_IDS": ids, "STEP": step})
            assert_near(got, expected, what=f"(STEP={step}, {pages_per_split} a split)")
            apart = ((got - whole).norm() / expected.norm()).item()
            assert apart < 1e-3, f"STEP={step} and whole pages {apart:.2e} apart"
            assert apart > 0 or window, "STEP changed nothing: was it read at all?"  # a window leaves one step
    with pytest.raises(ValueError, match="power of two from 16"):
        paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5, window, pages_per_split=2,
                     launch={**launch, "STEP": 24})


def test_mixed_pages_are_not_read_part_of_a_page_a_step():
    from kvfold.kernels.decode import paged_decode

    layer = filled_layer("zipcache:group=32,residual=16", 1, 1, 64, 90, 16, None, dtype=torch.float16)
    with pytest.raises(ValueError, match="not mixed pages"):
        paged_decode(torch.randn(1, 4, 64, device=DEVICE).half(), layer.kernel_parts(), 89, 0.125, pages_per_split=2,
                     launch={"num_warps": 1, "num_stages": 3, "COLUMNS": 1, "STEP": 16})


def test_page_ids_need_a_power_of_two_pages_a_split():
    from kvfold.kernels.decode import paged_decode

    layer = filled_layer("kivi:4,group=16,residual=16", 1, 1, 64, 90, 16, None, dtype=torch.float16)
    query = torch.randn(1, 4, 64, device=DEVICE).half()
    with pytest.raises(ValueError, match="power of two, not 3"):
        paged_decode(query, layer.kernel_parts(), 89, 0.125, pages_per_split=3,
                     launch={"num_warps": 1, "num_stages": 3, "COLUMNS": 1, "PAGE_IDS": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float8_pages_by_default_keep_the_querys_precision(dtype):
    """By default 64-token float8 pages go to the columns kernel (float16 dots) for 16-bit queries only: a float32
    query keeps float32 dots, so its output matches the reference to float32 rounding."""
    from kvfold.kernels.decode import paged_decode

    tokens, dim, group = 150, 64, 4
    layer, query, expected = decode_case("fp8:scale=page", tokens, dim, group, 64, query_dtype=dtype)
    got = paged_decode(query, layer.kernel_parts(), tokens - 1, dim ** -0.5)
    assert_near(got, expected, 1e-5 if dtype == torch.float32 else BOUND[dtype])


@pytest.mark.parametrize("spec", ["none", "kivi:4,group=16,residual=16"])
def test_output_in_the_models_dtype_is_the_float32_output_rounded(spec):
    """`out_dtype` (the fast loop asks for the model's dtype) changes only the rounding of the merged output."""
    from kvfold.kernels.decode import paged_decode

    layer = filled_layer(spec, 2, 2, 64, 90, 16, None, dtype=torch.float16)
    query = torch.randn(4, 4, 64, device=DEVICE).half()
    exact = paged_decode(query, layer.kernel_parts(), 89, 0.125)
    rounded = paged_decode(query, layer.kernel_parts(), 89, 0.125, out_dtype=torch.float16)
    assert exact.dtype == torch.float32 and rounded.dtype == torch.float16
    assert torch.equal(rounded, exact.half())


def test_negative_tile_tokens_is_refused():
    from kvfold.kernels.decode import paged_decode

    layer = filled_layer("none", 1, 1, 64, 20, 16, None, dtype=torch.float16)
    query = torch.randn(1, 4, 64, device=DEVICE).half()
    with pytest.raises(ValueError, match="tile_tokens must be >= 0"):
        paged_decode(query, layer.kernel_parts(), 19, 0.125, tile_tokens=-1)


@pytest.mark.parametrize("spec", ["zipcache:group=32,residual=16", "zipcache:8,low=4,group=16,residual=16,salient=0.3",
                                  "rotate+zipcache:group=32,residual=16"])
@pytest.mark.parametrize("dim, group", [(64, 4), (128, 3)])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
def test_zipcache_mixed_pages_match_reference(spec, dim, group, dtype):
    """ZipCache's pages (salient slots at high bits, the rest at low bits, channel-separable values) read as two
    parts of one page table, any number of slots per part; float32 queries too (float16 dots)."""
    from kvfold.kernels.decode import paged_decode

    tokens = 150
    layer, query, expected = decode_case(spec, tokens, dim, group, 16, dtype=dtype)
    parts = layer.kernel_parts()
    mixed = [part for part in parts if part.page_tokens]
    assert len(mixed) == 2 and {part.positions.shape[1] for part in mixed} & {13, 19, 5, 11}  # not powers of two
    got = paged_decode(query, parts, tokens - 1, dim ** -0.5, pages_per_split=2)
    assert_near(got, expected, BOUND[torch.bfloat16 if dtype == torch.bfloat16 else torch.float16])


def test_zipcache_pages_the_kernel_cannot_read_go_to_the_reference():
    """Bit fields narrower than 16 channels (2-bit, head_dim 32) or a sliding window: the layer reads its store with
    the reference, and the kernel refuses such parts with a clear error."""
    from kvfold.kernels.decode import paged_decode, supports

    narrow = filled_layer("zipcache:group=32,residual=16", 1, 1, 32, 80, 16, None, dtype=torch.float16)
    assert not supports(narrow.kernel_parts(), 32)
    windowed = filled_layer("zipcache:group=32,residual=16", 1, 1, 64, 80, 16, 23, dtype=torch.float16)
    assert not windowed.kernel_readable
    query = torch.randn(1, 1, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="sliding window"):
        paged_decode(query, windowed.kernel_parts(), 79, 0.125, sliding_window=23)


def test_kivi_bit_fields_cover_every_channel():
    """One packed key differs from the others in one channel only, and so does the query: if the kernel read that
    channel (whichever bit field of its byte holds it), the token wins the softmax and the output is its value."""
    from kvfold.compressor import Compressor
    from kvfold.kernels.decode import paged_decode
    from kvfold.layer import KVFoldLayer

    dim, tokens, special = 64, 64, 20
    for bits in (2, 4, 8):
        for channel in (0, 1, 2, 3, 37, dim - 1):
            keys = torch.zeros(1, 1, tokens, dim, dtype=torch.float16, device=DEVICE)
            keys[..., special, channel] = 3.0
            values = torch.zeros_like(keys)
            values[..., special, :] = 100.0
            layer = KVFoldLayer(Compressor.parse(f"kivi:{bits},group=16,residual=16"))
            layer.lazy_initialization(keys, values)
            layer.seen = tokens
            layer._append_rows(keys, values, torch.arange(tokens, device=DEVICE),
                               torch.ones(1, 1, tokens, dtype=torch.bool, device=DEVICE))
            assert layer.packed.lengths.item() > special  # the special token is in a packed page
            query = torch.zeros(1, 1, dim, dtype=torch.float16, device=DEVICE)
            query[..., channel] = 4.0
            out = paged_decode(query, layer.kernel_parts(), tokens - 1, 1.0)
            assert out.min() > 99.0, (bits, channel, out.min().item())


@pytest.mark.parametrize("spec", ["fp8", "fp8:e5m2,scale=page", "fp8:e5m2"])
def test_float8_pages_with_small_values_keep_their_precision(spec):
    """Value scales of small values (~1e-5 for e5m2) times probabilities must not become float16 subnormals."""
    from kvfold.kernels.decode import paged_decode

    layer = filled_layer(spec, 2, 2, 64, 1000, dtype=torch.float16, value_std=0.01)  # batch 0: empty, 1 token
    query = torch.randn(4, 4, 64, device=DEVICE).to(torch.float16)
    expected = paged_attention(query.float(), torch.full((4,), 999, device=DEVICE), layer.chunks(), 0.125)
    got = paged_decode(query, layer.kernel_parts(), 999, 0.125)
    err = ((got - expected).norm() / expected.norm()).item()
    # float8 values are exact in float16, so what is left is float16 rounding of q and p: ~2e-5 here, where
    # multiplying p by the raw scales (float16 subnormals) gave ~1.3e-4
    assert err < 5e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("spec", ["none", "kivi:4,group=16,residual=16", "kv4:2,group=32,residual=16", "fp8",
                                  "fp8:e5m2,scale=page,group=32,residual=16"])
def test_free_slots_holding_nan_never_reach_the_output(spec, monkeypatch):
    """Pools are grown with NaN in every float field (free pages and the unused slots of last pages): the kernels'
    masks must keep them out (0 × NaN is NaN), as the reference's do."""
    from kvfold.kernels.decode import paged_decode
    from kvfold.pages import PagePool

    grow = PagePool._grow

    def grow_with_nan(self, extra):
        grow(self, extra)
        for name, tensor in self.tensors.items():
            if tensor.dtype.is_floating_point:
                tensor[self.capacity - extra:] = float("nan")

    monkeypatch.setattr(PagePool, "_grow", grow_with_nan)
    layer = filled_layer(spec, 2, 2, 64, 150, 64 if spec == "none" else 16, dtype=torch.float16)
    assert any(torch.isnan(t).any() for _, rows in layer.stores() for t in rows.pool.tensors.values()
               if t.dtype.is_floating_point)  # the kernels do read pages that hold NaN in their free slots
    query = torch.randn(4, 4, 64, device=DEVICE).to(torch.float16)
    expected = paged_attention(query.float(), torch.full((4,), 149, device=DEVICE), layer.chunks(), 0.125)
    got = paged_decode(query, layer.kernel_parts(), 149, 0.125, pages_per_split=2)
    assert not torch.isnan(expected).any() and not torch.isnan(got).any()
    assert ((got - expected).norm() / expected.norm()).item() < BOUND[torch.float16]


def test_pages_of_a_size_triton_cannot_tile_are_left_to_the_reference():
    """Triton's tiles need a power-of-two number of tokens per page: page_size=48 (or kivi group=96) is read by the
    reference instead of crashing in the kernel."""
    from kvfold.kernels.decode import supports

    assert not supports(filled_layer("none", 2, 2, 64, 150, 48).kernel_parts(), 64)
    assert not supports(filled_layer("kivi:4,group=96,residual=96", 2, 2, 64, 300).kernel_parts(), 64)
    assert supports(filled_layer("kivi:4,group=64,residual=64", 2, 2, 64, 300).kernel_parts(), 64)


@pytest.mark.parametrize("bits, dim, two_bit_words", [(4, 64, False), (4, 128, False), (8, 32, False),
                                                      (8, 64, False), (2, 128, False), (2, 128, True),
                                                      (2, 64, True)])
def test_packed_words_hold_channels_in_the_order_the_kernel_reads(bits, dim, two_bit_words):
    """The packed kernel reads 16-bit words (4- and 8-bit codes wide enough; 2-bit ones too with `two_bit_words`)
    or bytes; in either, bit field r of word w must be channel w * fields + r of the codes `reference.pack` wrote."""
    from kvfold.kernels.decode import packed_words
    from kvfold.kernels.reference import pack

    codes = torch.randint(0, 2 ** bits, (3, 16, dim))
    words = packed_words(pack(codes, bits), dim, bits, two_bit_words)
    wide = (bits >= 4 or two_bit_words) and dim * bits >= 256
    assert words.dtype == (torch.uint16 if wide else torch.uint8)
    width = words.element_size() * 8
    fields = width // bits
    as_int = words.view(torch.int16).int() & 0xFFFF if width == 16 else words.int()
    for r in range(fields):
        assert torch.equal((as_int >> (r * bits)) & (2 ** bits - 1), codes[..., r::fields].int()), r
