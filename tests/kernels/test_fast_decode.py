"""The 16-bit-query kernels (`kernels.fast_decode`: 16-bit, float8, KIVI and KV4 pages) equal the reference paged
attention within 16-bit rounding.

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

    batch, kv_heads, tokens = 2, 2, 150
    layer = filled_layer(spec, batch, kv_heads, dim, tokens, 64 if spec == "none" else 16, window, dtype=dtype)
    parts = layer.kernel_parts()
    kinds = {fast_kind(part, dim, torch.device(DEVICE)) for part in parts}
    assert kinds & {"full", "packed"}, "no part went to a fast kernel: the test would not test them"
    query = (torch.randn(batch * kv_heads, group, dim, device=DEVICE) * 2).to(dtype)
    expected = paged_attention(query.float(), torch.full((group,), tokens - 1, device=DEVICE), layer.chunks(), dim ** -0.5,
                               window)
    got = paged_decode(query, parts, tokens - 1, dim ** -0.5, window, pages_per_split=2)
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # the empty row
    err = ((got - expected).norm() / expected.norm()).item()
    # a part too narrow for the fast kernel's dot products on a GPU goes to the general kernel: bfloat16 dots
    bound = BOUND[dtype] if kinds <= {"full", "packed"} else BOUND[torch.bfloat16]
    assert err < bound, f"relative error {err:.2e}"


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
