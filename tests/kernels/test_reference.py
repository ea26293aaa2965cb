import pytest
import torch

from kvfold.kernels.reference import KVChunk, pack, paged_attention, quantize, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips(bits):
    codes = torch.randint(0, 2**bits, (5, 7, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_error_is_at_most_half_a_step(bits):
    x = torch.randn(6, 64, 32) * 3
    q = quantize(x, bits, reduce_dims=(1,))
    restored = unpack(q.codes, bits).float() * q.scale.float().unsqueeze(1) + q.zero.float().unsqueeze(1)
    step = q.scale.float().unsqueeze(1)
    # half a step of rounding plus float16 rounding of scale and zero
    assert ((restored - x).abs() <= step / 2 + 2e-3 * x.abs().amax()).all()


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_dense_softmax(chunk, window):
    torch.manual_seed(0)
    rows, n, dim, tokens = 4, 3, 16, 23
    q = torch.randn(rows, n, dim)
    k, v = torch.randn(rows, tokens, dim), torch.randn(rows, tokens, dim)
    positions = torch.arange(tokens).expand(rows, tokens)
    valid = torch.rand(rows, tokens) > 0.3
    valid[:, -1] = True
    q_pos = torch.tensor([tokens - 3, tokens - 2, tokens - 1])
    chunks = [KVChunk(k[:, s:s + chunk], v[:, s:s + chunk], positions[:, s:s + chunk], valid[:, s:s + chunk])
              for s in range(0, tokens, chunk)]
    out = paged_attention(q, q_pos, chunks, scale=0.25, sliding_window=window)
    visible = valid.unsqueeze(1) & (positions.unsqueeze(1) <= q_pos.view(1, n, 1))
    if window:
        visible &= q_pos.view(1, n, 1) - positions.unsqueeze(1) < window
    logits = (q @ k.transpose(1, 2) * 0.25).masked_fill(~visible, float("-inf"))
    expected = torch.softmax(logits, dim=-1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_paged_attention_ignores_garbage_in_empty_slots():
    q = torch.randn(1, 1, 8)
    k, v = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    v[0, 2:] = float("nan")
    valid = torch.tensor([[True, True, False, False]])
    out = paged_attention(q, torch.tensor([10]), [KVChunk(k, v, torch.arange(4).view(1, 4), valid)], 1.0)
    assert torch.isfinite(out).all()
