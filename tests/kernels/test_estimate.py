"""The low-bit estimate of the sparse prefill's pattern (SALE-style, `pattern.lowbit_mask`): the Triton kernel
computes the reference's block masses, the reference is exact attention's block mass up to its stated
approximations (rounding to 4/8 bits, a sample of rows), and the masks it picks keep the mass gamma promises."""

import importlib.util

import pytest
import torch

from kvfold.kernels.pattern import lowbit_block_mass, lowbit_mask, pick_blocks, sampled_rows

from .test_decode import DEVICE
from .test_sparse import structured_qkv

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def exact_block_mass(query, key, scale, block):
    """Each query row's exact softmax summed per (query block, key block) [batch, q_heads, blocks, blocks]."""
    group, tokens = query.shape[1] // key.shape[1], query.shape[2]
    scores = (query.float() @ key.float().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).tril()
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    blocks = -(-tokens // block)
    token_block = torch.arange(tokens, device=query.device) // block
    per_key = torch.zeros(*weights.shape[:3], blocks, device=query.device).index_add_(3, token_block, weights)
    return torch.zeros(*weights.shape[:2], blocks, blocks, device=query.device).index_add_(2, token_block, per_key)


@pytest.mark.parametrize("tokens, block, group, rows, bits, dim", [
    (200, 16, 3, 4, 4, 32), (256, 32, 1, 8, 8, 64), (130, 16, 4, 16, 4, 32), (64, 64, 2, 8, 4, 128),
    (17, 16, 8, 2, 8, 32), (520, 16, 2, 4, 4, 32)])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("mode", [{"PERSISTENT": 0, "PREFETCH": 0}, {"PERSISTENT": 0, "PREFETCH": 1},
                                  {"PERSISTENT": 1, "PREFETCH": 0}, {"PERSISTENT": 1, "PREFETCH": 1}],
                         ids=["one-tile", "prefetch", "persistent", "persistent-prefetch"])
def test_the_estimate_kernel_computes_the_reference_masses(tokens, block, group, rows, bits, dim, dtype, mode):
    """Ragged last blocks (200 = 12 x 16 + 8, 17 = 16 + 1), GQA 1..8, every row sampled (16 of 16), 4 and 8 bits,
    33 key blocks (the shares are summed 16 key blocks a step); one tile a program or PERSISTENT (tiles from a
    counter), key scales loaded a block ahead or not (PREFETCH: compiled only, the interpreter runs the masked loop):
    the kernel's weights equal the reference's to float32 rounding (integer dot products are exact), so the masks
    picked from them agree; every sampled row adds shares summing to 1, so each query block's row sums to `rows`."""
    from kvfold.kernels.estimate import lowbit_block_mass_triton

    torch.manual_seed(tokens + group)
    query = torch.randn(2, 2 * group, tokens, dim, device=DEVICE).to(dtype)
    key = (torch.randn(2, 2, tokens, dim, device=DEVICE) + torch.randn(dim, device=DEVICE)).to(dtype)
    want = lowbit_block_mass(query, key, dim ** -0.5, block, bits, rows)
    got = lowbit_block_mass_triton(query, key, dim ** -0.5, block, bits, rows, launch=mode)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.full(got.shape[:-1], float(rows), device=DEVICE))
    assert torch.equal(got.triu(1), torch.zeros_like(got))  # nothing above the diagonal
    assert torch.equal(pick_blocks(got, 0.9), pick_blocks(want, 0.9))


def test_the_low_bit_mask_leaves_the_masses_above_the_diagonal_unset():
    """`lowbit_mask(kernel=True)` asks the estimate for its masses with `upper=False` (no memset of blocks^2 floats):
    the visible ones are the same, and so are the mask and the lists picked from them."""
    from kvfold.kernels.estimate import lowbit_block_mass_triton, pick_blocks_triton

    torch.manual_seed(3)
    query, key = torch.randn(1, 6, 300, 32, device=DEVICE).half(), torch.randn(1, 2, 300, 32, device=DEVICE).half()
    whole = lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, 4)
    assert torch.equal(lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, 4, upper=False).tril(), whole)
    mask, (picks, counts, diagonal) = lowbit_mask(query, key, 32 ** -0.5, 0.9, 16, 4, 4, kernel=True, lists=True)
    want_mask, (want_picks, want_counts, _) = pick_blocks_triton(whole, 0.9, lists=True)
    listed = torch.arange(mask.shape[-1], device=DEVICE) < counts[..., None]
    assert torch.equal(mask, want_mask) and torch.equal(counts, want_counts)
    assert torch.equal(picks[listed], want_picks[listed]) and bool(diagonal.all())


@pytest.mark.parametrize("launch", [{"PAIRS": 4}, {"PAIRS": 16, "num_warps": 8}, {"PAIRS": 8, "FLOAT8": 0},
                                    {"PAIRS": 32}])
def test_the_estimate_kernel_launches_read_the_same_masses(launch, monkeypatch):
    """Launches: 4 to 32 of the 39 (query block, head) pairs of each KV head a tile (13 blocks x GQA 3: tiles
    starting mid-block, the last partly past the end; the default is 16 at 4 rows), 4-bit codes as int8 instead of
    float8; one tile a program (all at once, 3 a launch, and a scratch for one program: one a launch), and
    PERSISTENT (3 programs taking the tiles in turn from a counter, and one doing every tile, reusing its
    scratch); the masses stay the reference's. A tile must be a power of two of >= 16 rows. (PREFETCH, key scales
    a block ahead, changes only the compiled loop: the interpreter runs the masked one.)"""
    from kvfold.kernels import estimate
    from kvfold.kernels.estimate import lowbit_block_mass_triton

    torch.manual_seed(3)
    query = torch.randn(1, 6, 200, 32, device=DEVICE).half()
    key = torch.randn(1, 2, 200, 32, device=DEVICE).half()
    want = lowbit_block_mass(query, key, 32 ** -0.5, 16, 4, 4)
    for persistent in ({"PERSISTENT": 0}, {"PERSISTENT": 1, "PREFETCH": 1}):
        options = {**launch, **persistent}
        for slots in ({}, {"SLOTS": 3}):
            torch.testing.assert_close(lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, 4,
                                                                launch={**options, **slots}), want, rtol=1e-4, atol=1e-5)
        with monkeypatch.context() as patch:
            patch.setattr(estimate, "SCRATCH_BYTES", launch["PAIRS"] * 4 * 13 * 4)  # tile rows, key blocks, float32
            torch.testing.assert_close(lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, 4, launch=options),
                                       want, rtol=1e-4, atol=1e-5)
    for pairs in (2, 5):
        with pytest.raises(ValueError, match="PAIRS must be a power of two"):
            lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, 4, launch={"PAIRS": pairs})


def test_the_estimate_kernel_goes_persistent_by_default_only_where_the_scratch_splits_the_launches(monkeypatch):
    """The default launch (PERSISTENT None): one tile a program, all in one launch, while the scratch holds every
    tile (3 tiles x 2 KV heads here); one persistent launch (programs taking tiles from a counter, as many as the
    scratch holds) where one tile a program would take several launches. The masses are the reference's either way."""
    from kvfold.kernels import estimate

    grids, kernel = [], estimate._lowbit_mass_kernel

    class RecordingGrids:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(estimate, "_lowbit_mass_kernel", RecordingGrids())
    torch.manual_seed(3)
    query = torch.randn(1, 6, 200, 32, device=DEVICE).half()
    key = torch.randn(1, 2, 200, 32, device=DEVICE).half()
    want = lowbit_block_mass(query, key, 32 ** -0.5, 16, 4, 4)
    assert estimate.ESTIMATE_LAUNCH["PERSISTENT"] is None
    torch.testing.assert_close(estimate.lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, 4), want, rtol=1e-4,
                               atol=1e-5)
    assert grids == [(3, 2)]
    monkeypatch.setattr(estimate, "SCRATCH_BYTES", 2 * 13 * 64 * 4)  # two programs' (13 key blocks x 64 rows)
    torch.testing.assert_close(estimate.lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, 4), want, rtol=1e-4,
                               atol=1e-5)
    assert grids[1:] == [(2, 1)]


@pytest.mark.parametrize("tokens, group, rows", [(200, 3, 4), (64, 1, 16)])
def test_the_estimate_kernel_weighs_blocks_by_their_largest_score(tokens, group, rows):
    """reduce="max": the kernel's weights equal the reference's; per row a block weighs its largest exp(score), as a
    share of the row's sum of them, so each query block's row sums to `rows`."""
    from kvfold.kernels.estimate import lowbit_block_mass_triton

    torch.manual_seed(5)
    query = torch.randn(1, 2 * group, tokens, 32, device=DEVICE).half()
    key = torch.randn(1, 2, tokens, 32, device=DEVICE).half()
    want = lowbit_block_mass(query, key, 32 ** -0.5, 16, 4, rows, "max")
    got = lowbit_block_mass_triton(query, key, 32 ** -0.5, 16, 4, rows, "max")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.triu(1), torch.zeros_like(got))
    torch.testing.assert_close(got.sum(-1), torch.full(got.shape[:-1], float(rows), device=DEVICE))
    assert torch.equal(pick_blocks(got, 0.9), pick_blocks(want, 0.9))


def test_the_estimate_approaches_exact_block_mass_with_every_row_and_8_bits():
    """Normalised per query block, the estimate is each query block's share of attention per key block up to
    rounding Q and smoothed K per token and the row sample. With every row (rows = block) at 8 bits it is within
    1% (L1) of exact attention's share in every query block, at 4 bits 13%; with 4 of 32 rows 20% on this
    pattern (measured: 0.7%, 11.7%, 17.5%)."""
    query, key, _ = structured_qkv(tokens=256, dtype=torch.float32)
    exact = exact_block_mass(query, key, 32 ** -0.5, 32)
    exact = exact / exact.sum(-1, keepdim=True)
    for rows, bits, bound in [(32, 8, 0.01), (32, 4, 0.13), (4, 4, 0.2)]:
        estimate = lowbit_block_mass(query, key, 32 ** -0.5, 32, bits, rows)
        estimate = estimate / estimate.sum(-1, keepdim=True)
        error = (estimate - exact).abs().sum(-1).max().item()  # per query block, L1
        assert error < bound, (rows, bits, error)


def test_the_low_bit_mask_keeps_the_mass_gamma_promises():
    """On a pattern with vertical lines, sinks and noise: the mask keeps at least gamma of the exact attention mass
    on average over the query blocks and within 0.1 of it in every block (8 of 32 rows estimate a block's mass:
    a sample), reads fewer blocks than all of them, and gamma = 1 keeps every causal block."""
    query, key, _ = structured_qkv(tokens=256)
    scale = 32 ** -0.5
    exact = exact_block_mass(query, key, scale, 32)
    full = lowbit_mask(query, key, scale, gamma=1.0, block=32)
    assert torch.equal(full, torch.ones_like(full).tril())
    for gamma, reduce in [(0.8, "sum"), (0.9, "sum"), (0.95, "max")]:  # max: a larger gamma for the same recall
        mask = lowbit_mask(query, key, scale, gamma=gamma, block=32, bits=4, rows=8, reduce=reduce)
        recall = (exact * mask).sum(-1) / exact.sum(-1)  # per query block
        assert recall.mean() >= gamma and recall.min() > gamma - 0.1 and mask.sum() < full.sum()
        assert mask.diagonal(dim1=-2, dim2=-1).all()


def test_sampled_rows_and_bad_settings():
    assert sampled_rows(40, 16, 4).tolist() == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 39, 39]
    assert sampled_rows(16, 16, 1).tolist() == [15]
    query = torch.zeros(1, 2, 32, 32)
    for bits, rows in [(2, 8), (4, 3), (4, 32)]:
        with pytest.raises(ValueError, match="bits must be 4 or 8 and rows a power of two"):
            lowbit_block_mass(query, query, 1.0, 16, bits, rows)
    with pytest.raises(ValueError, match="reduce must be sum or max"):
        lowbit_block_mass(query, query, 1.0, 16, 4, 8, "mean")



@pytest.mark.parametrize("tokens, block, group, rows, bits, dim", [
    (200, 16, 3, 4, 4, 32), (17, 16, 8, 2, 8, 64), (64, 64, 1, 8, 4, 128)])
@pytest.mark.parametrize("float8", [False, True])
def test_the_codes_kernel_rounds_the_reference_codes(tokens, block, group, rows, bits, dim, float8):
    """`lowbit_codes_triton` = `lowbit_operands` code for code and scale for scale: ragged last blocks (a short last
    block repeats its last token), GQA 1-8, 4 and 8 bits, keys read through strides ([batch, tokens, heads, dim]
    transposed, as attention layers hand them over; the queries too), ties rounded to even; float8 only holds 4-bit
    codes."""
    from kvfold.kernels.estimate import lowbit_codes_triton
    from kvfold.kernels.pattern import lowbit_operands

    if float8 and bits == 8:
        pytest.skip("8-bit codes are not exact in float8 e4m3")
    torch.manual_seed(tokens)
    query = torch.randn(2, tokens, 2 * group, dim, device=DEVICE).half().transpose(1, 2)  # strided too
    key = (torch.randn(2, tokens, 2, dim, device=DEVICE) + 3).half().transpose(1, 2)  # strided, offset channels
    top = 2 ** (bits - 1) - 1
    tie = sampled_rows(tokens, block, rows)[0]  # step 1 exactly: halves round to even
    query[0, 0, tie] = 0.0
    query[0, 0, tie, :4] = torch.tensor([top, 2.5, 3.5, -2.5])
    q_codes, q_scales, k_codes, k_scales, _ = lowbit_operands(query, key, block, bits, rows)
    got = lowbit_codes_triton(query, key, block, bits, rows, float8)
    grouped = lambda x: x.unflatten(1, (2, group)).unflatten(3, (-1, rows)).transpose(2, 3)  # noqa: E731
    assert got[0].dtype == (torch.float8_e4m3fn if float8 else torch.int8)
    assert torch.equal(got[0].float(), grouped(q_codes).float()) and torch.equal(got[1], grouped(q_scales))
    assert torch.equal(got[2].float(), k_codes.float()) and torch.equal(got[3], k_scales)
    assert got[0][0, 0, 0, 0, 0, :4].tolist() == [top, 2, 4, -2]
    assert k_codes.abs().amax() == top


@pytest.mark.parametrize("blocks", [1, 5, 37])
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("arity", [2, 4])
def test_the_pick_kernel_picks_the_reference_blocks(blocks, gamma, arity):
    """`pick_blocks_triton` (a search on the masses' float bits: bisection, or three thresholds a step) =
    `pick_blocks` (a sort and a running sum) on random masses with a heavy tail, ragged block counts (1, 5, 37),
    gamma 1 (every visible block with mass); only the visible (causal) masses count, whatever lies above the
    diagonal. With `lists`, the sparse kernel's block lists too, as `block_lists` makes them from the mask."""
    from kvfold.kernels.estimate import pick_blocks_triton
    from kvfold.kernels.sparse import block_lists

    torch.manual_seed(blocks)
    mass = torch.rand(1, 2, blocks, blocks, device=DEVICE) ** 4
    mass[0, 0, :, 0] = 0.0  # blocks with no mass are never picked (but the diagonal)
    launch = {"ARITY": arity}
    got = pick_blocks_triton(mass, gamma, launch=launch)
    assert torch.equal(got, pick_blocks(mass.tril(), gamma))
    unset = torch.ones(blocks, blocks, dtype=torch.bool, device=DEVICE).triu(1)  # as `upper=False` leaves them
    assert torch.equal(pick_blocks_triton(mass.masked_fill(unset, float("nan")), gamma, launch=launch), got)
    assert torch.equal(got, pick_blocks(mass, gamma))
    mask, lists = pick_blocks_triton(mass, gamma, lists=True, launch=launch)  # the sparse kernel's lists too
    assert torch.equal(mask, got)
    (picks, counts, diagonal), (want_picks, want_counts, want_diagonal) = lists, block_lists(got)
    assert torch.equal(counts, want_counts) and torch.equal(diagonal, want_diagonal)
    listed = torch.arange(blocks, device=DEVICE) < counts[..., None]  # past its count a list is not set
    assert torch.equal(picks[listed], want_picks[listed])


def test_the_pick_kernel_keeps_blocks_tied_with_the_last_one_kept():
    """Four equal masses and gamma 0.5: the reference keeps two of them (its sort's order), the kernel all four
    (its threshold is a value); with distinct values they agree (above)."""
    from kvfold.kernels.estimate import pick_blocks_triton

    mass = torch.zeros(1, 1, 4, 4, device=DEVICE)
    mass[0, 0, 3] = 1.0
    assert pick_blocks_triton(mass, 0.5)[0, 0, 3].tolist() == [True, True, True, True]
    assert pick_blocks_triton(mass, 0.5, launch={"ARITY": 4})[0, 0, 3].tolist() == [True, True, True, True]
    assert pick_blocks(mass, 0.5)[0, 0, 3].sum() == 3  # two of the four, and the diagonal
