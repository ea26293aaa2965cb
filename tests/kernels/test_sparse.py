"""Sparse prefill: the block-sparse kernel equals its reference for any mask, and FlexPrefill's pattern choice keeps
the attention mass it promises (the mask of gamma = 1 is every causal block: exact attention)."""

import importlib.util

import pytest
import torch

from kvfold.kernels.reference import block_sparse_attention

from .test_decode import DEVICE
from .test_prefill import exact

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def structured_qkv(tokens=256, dim=32, q_heads=4, kv_heads=2, seed=0, dtype=torch.float16):
    """Attention with the shapes FlexPrefill looks for: a few key columns everyone reads (sinks, one 'needle'
    column) and a local diagonal, on top of noise."""
    torch.manual_seed(seed)
    q = torch.randn(1, q_heads, tokens, dim)
    k = torch.randn(1, kv_heads, tokens, dim) * 0.3
    v = torch.randn(1, kv_heads, tokens, dim)
    direction = torch.randn(dim)
    q += 2.0 * direction  # every query likes keys along `direction`
    k[:, :, [0, 1, 150]] += 2.0 * direction  # columns 0, 1 and 150 are vertical lines
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


@pytest.mark.parametrize("tokens, block, group", [(100, 16, 1), (256, 32, 2), (64, 16, 4)])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_block_sparse_kernel_matches_reference(tokens, block, group, dtype):
    """Random masks (some diagonal blocks unselected), ragged last blocks, GQA 1-4; the default launch (ANCHORED)
    and the running maximum's (FOLD alone)."""
    from kvfold.kernels.sparse import sparse_prefill, sparse_prefill_flagged

    torch.manual_seed(1)
    kv_heads = 2
    q = torch.randn(1, kv_heads * group, tokens, 32, device=DEVICE).to(dtype)
    k = torch.randn(1, kv_heads, tokens, 32, device=DEVICE).to(dtype)
    v = torch.randn(1, kv_heads, tokens, 32, device=DEVICE).to(dtype)
    blocks = -(-tokens // block)
    mask = torch.rand(1, kv_heads * group, blocks, blocks, device=DEVICE) < 0.5
    if group != 4:  # with group 4 some diagonal blocks stay unselected (their first queries then see nothing)
        mask |= torch.eye(blocks, dtype=torch.bool, device=DEVICE)
    got = sparse_prefill(q, k, v, mask, 32 ** -0.5, block, launch={"ANCHORED": False}).float()
    want = block_sparse_attention(q, k, v, mask, 32 ** -0.5, block)
    assert ((got - want).norm() / want.norm()).item() < (3e-3 if dtype == torch.float16 else 1.5e-2)
    anchored, redone = sparse_prefill_flagged(q, k, v, mask, 32 ** -0.5, block)
    assert not redone.any()  # no score far above its anchors here: every query block kept the anchored shift
    assert ((anchored.float() - want).norm() / want.norm()).item() < (3e-3 if dtype == torch.float16 else 1.5e-2)
    assert torch.equal(sparse_prefill(q, k, v, mask, 32 ** -0.5, block), anchored)
    full = torch.ones_like(mask)
    torch.testing.assert_close(block_sparse_attention(q, k, v, full, 32 ** -0.5, block),
                               exact(q, k, v, 32 ** -0.5), rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("launch", [{"ANCHORED": False, "FOLD": False}, {"ANCHORED": False}, {"LAZY": True},
                                    {"PAIRED": True}, {}], ids=["online", "fold", "lazy", "paired", "anchored"])
def test_block_sparse_kernel_launches_match_the_reference(launch):
    """The plain online softmax, the scale folded into the shift (FOLD), the running maximum moved only when it
    grows by more than 2^8 (LAZY), the listed blocks two a step (PAIRED; odd and even counts), the shift fixed at
    the anchors' maximum after the diagonal and first listed blocks (ANCHORED, the default; the 2^20 weights
    overflow float16, so those query blocks are redone): the same attention. A key far above the rest (block 4) makes every later row's maximum jump past
    the threshold after some tiles, and the rows' other tiles stay under it."""
    from kvfold.kernels.sparse import sparse_prefill

    torch.manual_seed(2)
    q = torch.randn(1, 4, 256, 32, device=DEVICE)
    k = torch.randn(1, 2, 256, 32, device=DEVICE)
    v = torch.randn(1, 2, 256, 32, device=DEVICE)
    direction = torch.nn.functional.normalize(torch.randn(32, device=DEVICE), dim=0)
    q += 4 * direction
    k[:, :, 70] += 20 * direction  # ~20 (log2) above the other scores: 2^20 overflows float16 unless rescaled
    q, k, v = q.half(), k.half(), v.half()
    mask = torch.rand(1, 4, 16, 16, device=DEVICE) < 0.5
    mask[..., 4] = True
    mask |= torch.eye(16, dtype=torch.bool, device=DEVICE)
    got = sparse_prefill(q, k, v, mask, 32 ** -0.5, 16, launch=launch).float()
    want = block_sparse_attention(q, k, v, mask, 32 ** -0.5, 16)
    assert {count % 2 for count in mask.tril(-1).sum(-1)[..., 2:].flatten().tolist()} == {0, 1}
    assert ((got - want).norm() / want.norm()).item() < 3e-3


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_anchored_blocks_that_overflow_are_redone_with_the_running_maximum(dtype):
    """ANCHORED shifts every listed block after the first by the anchors' maximum (the diagonal block's and the
    first listed one's). A key ~140 (log2 units) above them in a later listed block overflows those weights (inf,
    and inf - inf in the accumulator); the query blocks that read it are flagged and redone with the running
    maximum, so the output is still the reference's, with no NaN; blocks that never read it keep the anchored
    result (the same attention either way)."""
    from kvfold.kernels.sparse import sparse_prefill, sparse_prefill_flagged

    torch.manual_seed(4)
    q = torch.randn(1, 2, 128, 32, device=DEVICE)
    k = torch.randn(1, 1, 128, 32, device=DEVICE)
    v = torch.randn(1, 1, 128, 32, device=DEVICE)
    direction = torch.nn.functional.normalize(torch.randn(32, device=DEVICE), dim=0)
    q[:, 1] -= (q[:, 1] @ direction)[..., None] * direction  # head 1: nothing along it
    q[:, 0] += 12 * direction  # head 0 only: q . k[40] ~ 12 * 60 = 720, ~140 above the rest in log2 units
    k[:, :, 40] += 60 * direction
    v[:, :, 40] = torch.linspace(-3, 3, 32, device=DEVICE)  # values of both signs: inf - inf where p overflows
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = torch.eye(8, dtype=torch.bool, device=DEVICE).expand(1, 2, 8, 8).clone()
    mask[..., 5:, 0] = True  # anchors: key block 0 first, then key block 2 (token 40) in a later step
    mask[..., 5:, 2] = True
    got, redone = sparse_prefill_flagged(q, k, v, mask, 32 ** -0.5, 16, launch={"ANCHORED": True})
    got = got.float()
    want = block_sparse_attention(q, k, v, mask, 32 ** -0.5, 16)
    # head 0's query blocks 5-7 read key block 2 after their anchors; query block 2 sees token 40 on its diagonal
    assert redone.tolist() == [[[0] * 5 + [1] * 3, [0] * 8]]
    assert got.isfinite().all()
    assert ((got - want).norm() / want.norm()).item() < (3e-3 if dtype == torch.float16 else 1.5e-2)
    torch.testing.assert_close(got[0, 0, 80:], v[0, 0, 40].float().expand(48, -1), rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="ANCHORED replaces LAZY and PAIRED"):
        sparse_prefill(q, k, v, mask, 32 ** -0.5, 16, launch={"ANCHORED": True, "PAIRED": True})


def test_flexprefill_mask_keeps_the_attention_mass_it_promises():
    from kvfold.kernels.pattern import flexprefill_mask

    q, k, v = structured_qkv()
    scale = 32 ** -0.5
    full_mask, _ = flexprefill_mask(q, k, scale, gamma=1.0, block=32)
    blocks = full_mask.shape[-1]
    assert torch.equal(full_mask, torch.ones_like(full_mask).tril())  # gamma = 1: every causal block
    mask, aware = flexprefill_mask(q, k, scale, gamma=0.9, block=32)
    assert mask.sum() < full_mask.sum()  # sparser
    # recall: the attention mass of every query inside its selected blocks, against exact attention
    group = q.shape[1] // k.shape[1]
    weights = torch.softmax(((q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)) * scale)
                            .masked_fill(~torch.ones(256, 256, dtype=torch.bool, device=DEVICE).tril(), float("-inf")), -1)
    token_block = torch.arange(256, device=DEVICE) // 32
    kept = mask[..., token_block[:, None], token_block[None, :]]
    recall = (weights * kept).sum(-1)
    assert recall.mean() > 0.85 and blocks == 8
    out = block_sparse_attention(q, k, v, mask, scale, 32)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), exact(q, k, v, scale).flatten(), dim=0)
    assert cosine > 0.99


def test_flexprefill_mask_reads_gqa_keys_like_repeated_ones():
    """The pattern choice multiplies each KV head's keys with its group's queries in place (no per-query-head copy
    of the keys): the same masks as with the keys repeated to every query head, lengths not a multiple of blocks."""
    from kvfold.kernels.pattern import flexprefill_mask

    q, k, _ = structured_qkv(tokens=250, q_heads=6, kv_heads=2)
    for gamma in (0.8, 0.95):
        gqa, aware = flexprefill_mask(q, k, 32 ** -0.5, gamma=gamma, block=32)
        repeated, repeated_aware = flexprefill_mask(q, k.repeat_interleave(3, 1), 32 ** -0.5, gamma=gamma, block=32)
        assert torch.equal(gqa, repeated) and torch.equal(aware, repeated_aware) and gqa.shape == (1, 6, 8, 8)


def test_sparse_prefill_refuses_a_mask_of_the_wrong_shape():
    from kvfold.kernels.sparse import sparse_prefill

    q, k, v = structured_qkv(tokens=160)
    with pytest.raises(ValueError, match="mask"):
        sparse_prefill(q, k, v, torch.ones(1, 4, 3, 3, dtype=torch.bool, device=DEVICE), 0.2, 32)


def test_heads_whose_pooled_estimate_is_faithful_go_query_aware():
    """Near-uniform attention: the pooled queries and keys predict the last block's distribution, so every head
    uses the query-aware pattern (and the vertical-slash one for the structured heads above)."""
    from kvfold.kernels.pattern import flexprefill_mask

    q, k, _ = structured_qkv()
    _, aware = flexprefill_mask(q * 0.01, k * 0.01, 32 ** -0.5, gamma=0.9, block=32)
    assert aware.all()
    _, aware = flexprefill_mask(q, k, 32 ** -0.5, gamma=0.9, block=32)
    assert not aware.any()


def test_block_lists_walk_the_selected_blocks_in_order():
    """Per query block: the selected key blocks below the diagonal in ascending order (zeros after), their count,
    and the diagonal's flag."""
    from kvfold.kernels.sparse import block_lists

    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    picks, counts, diagonal = block_lists(mask[None, None])
    assert picks[0, 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]]
    assert counts[0, 0].tolist() == [0, 0, 2, 2] and diagonal[0, 0].tolist() == [1, 0, 1, 1]
