"""Low-bit prefill attention: the int8 reference is close to exact attention (and smoothing K is what makes it
so), and the Triton kernel equals the reference (TRITON_INTERPRET=1 on the CPU; compiled on a GPU)."""

import importlib.util

import pytest
import torch

from kvfold.kernels.reference import int8_prefill_attention

from .test_decode import DEVICE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def exact(query, key, value, scale):
    group = query.shape[1] // key.shape[1]
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + kv_len - q_len
    return torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1),
        attn_mask=mask.to(query.device), scale=scale)


def qkv(batch, q_heads, kv_heads, q_len, kv_len, dim, dtype=torch.float16, offset=4.0, seed=0):
    """Keys with a large per-channel offset (as real keys have), so that smoothing matters."""
    torch.manual_seed(seed)
    query = torch.randn(batch, q_heads, q_len, dim)
    key = torch.randn(batch, kv_heads, kv_len, dim) + offset * torch.randn(1, kv_heads, 1, dim)
    value = torch.randn(batch, kv_heads, kv_len, dim)
    return query.to(DEVICE, dtype), key.to(DEVICE, dtype), value.to(DEVICE, dtype)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_int8_reference_is_close_to_exact_attention_because_keys_are_smoothed():
    query, key, value = qkv(1, 4, 2, 256, 256, 64, dtype=torch.float32)
    want = exact(query, key, value, 0.125)
    assert cosine(int8_prefill_attention(query, key, value, 0.125), want) > 0.999
    # without smoothing (the offsets take the int8 range) the same rounding costs far more
    from kvfold.kernels import reference
    smoothed = reference.smooth_keys
    try:
        reference.smooth_keys = lambda keys: keys
        rough = int8_prefill_attention(query, key, value, 0.125)
    finally:
        reference.smooth_keys = smoothed
    rough_error = (rough - want).norm() / want.norm()
    error = (int8_prefill_attention(query, key, value, 0.125) - want).norm() / want.norm()
    assert rough_error > 2 * error


@pytest.mark.parametrize("batch, q_heads, kv_heads, q_len, kv_len, dim", [
    (1, 2, 2, 100, 100, 32),  # lengths not multiples of the blocks
    (2, 4, 1, 64, 64, 64),  # GQA 4
    (1, 6, 2, 40, 150, 32),  # the last 40 positions of 150 (a chunk over a filled past)
    (1, 2, 1, 1, 33, 32),  # one query
])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
# key tiles of one int8 block (its scale folded into the query's) and of several (a scale per key)
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 32)] if DEVICE == "cpu" else [(64, 64), None])
@pytest.mark.parametrize("tma", [False, True])
def test_int8_prefill_kernel_matches_reference(batch, q_heads, kv_heads, q_len, kv_len, dim, dtype, tiles, tma):
    """Query tiles larger than the key tiles (and than the quantization blocks) included: the causal split into
    unmasked and masked key tiles must hold for any of them. tma: keys and values through tensor descriptors
    over every head's rows (a tile past a head's end reads the next head's keys, which the mask must hide)."""
    from kvfold.kernels.prefill import int8_prefill

    query, key, value = qkv(batch, q_heads, kv_heads, q_len, kv_len, dim, dtype)
    block = 16 if DEVICE == "cpu" else 64
    launch = ({} if tiles is None else {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}) | ({"TMA": True} if tma else {})
    got = int8_prefill(query, key, value, dim ** -0.5, block, block, launch).float()
    want = int8_prefill_attention(query, key, value, dim ** -0.5, block, block)
    error = ((got - want).norm() / want.norm()).item()
    assert error < (3e-3 if dtype == torch.float16 else 1.5e-2), error  # P and the output rounded to 16 bits
    assert cosine(got, exact(query, key, value, dim ** -0.5)) > 0.998


def test_values_at_an_unaligned_offset_are_read_without_tensor_descriptors():
    """Bulk copies need 16-byte aligned bases: a value view at an odd offset (a slice of a larger buffer) takes
    pointer loads, and gives the same output as an aligned copy through descriptors."""
    from kvfold.kernels.prefill import int8_codes, int8_prefill, use_tma

    query, key, value = qkv(1, 4, 2, 48, 48, 32)
    buffer = torch.empty(value.numel() + 1, device=DEVICE, dtype=value.dtype)
    shifted = buffer[1:].view(value.shape)
    shifted.copy_(value)
    assert shifted.data_ptr() % 16 and shifted.is_contiguous()
    launch = {"BLOCK_M": 16, "BLOCK_N": 16, "TMA": True}
    codes, _ = int8_codes(key, 16, smooth=True)
    hopper = DEVICE != "cuda" or torch.cuda.get_device_capability()[0] >= 9  # the interpreter reads descriptors
    assert use_tma(launch, False, codes, value) == hopper and not use_tma(launch, False, codes, shifted)
    assert not use_tma(launch, True, codes, value)  # float8 values are stored transposed: pointer loads
    aligned = int8_prefill(query, key, value, 0.2, 16, 16, launch)
    assert torch.equal(int8_prefill(query, key, shifted, 0.2, 16, 16, launch), aligned)


def test_int8_codes_pass_equals_the_reference_blocks():
    """The Triton quantization pre-pass: the reference's scales, codes off by at most one (on rounding ties)."""
    from kvfold.kernels.prefill import int8_codes
    from kvfold.kernels.reference import int8_blocks, smooth_keys

    _, key, _ = qkv(2, 2, 2, 8, 70, 32)
    for smooth in (False, True):
        codes, scales = int8_codes(key, 16, smooth)
        want_codes, want_scales = int8_blocks(smooth_keys(key.float()) if smooth else key, 16)
        torch.testing.assert_close(scales, want_scales, rtol=1e-5, atol=0)
        assert (codes.int() - want_codes.int()).abs().max() <= 1 and scales.shape == (2, 2, 5)


def test_int8_prefill_refuses_bad_shapes():
    from kvfold.kernels.prefill import int8_prefill

    query, key, value = qkv(1, 3, 2, 8, 8, 32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        int8_prefill(query, key, value, 0.25)
    query, key, value = qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="head_dim >= 32"):  # int8 tensor-core dots reduce over >= 32
        int8_prefill(query, key, value, 0.25)


@pytest.mark.parametrize("q_len, kv_len", [(100, 100), (40, 150)])
@pytest.mark.parametrize("tma", [False, True])
def test_fp8_pv_kernel_stays_close_to_its_reference(q_len, kv_len, tma):
    """P·V in float8 (SageAttention2): P is rounded at the kernel's running maximum, the reference's at the final
    one, so they agree to float8's rounding, not bit for bit."""
    from kvfold.kernels.prefill import int8_prefill

    query, key, value = qkv(1, 4, 2, q_len, kv_len, 64)
    block = 16 if DEVICE == "cpu" else 64
    launch = ({"BLOCK_M": 32, "BLOCK_N": 16} if DEVICE == "cpu" else {}) | ({"TMA": True} if tma else {})
    got = int8_prefill(query, key, value, 0.125, block, block, launch, pv_fp8=True).float()
    want = int8_prefill_attention(query, key, value, 0.125, block, block, pv_fp8=True)
    assert ((got - want).norm() / want.norm()).item() < 0.08  # e4m3 keeps 3 mantissa bits: ~4% per product
    assert cosine(got, exact(query, key, value, 0.125)) > 0.995


@pytest.mark.parametrize("choice, module, kernel", [("int8", "prefill", "int8_prefill"),
                                                    ("int8:pv=fp8", "prefill", "int8_prefill"),
                                                    ("sparse:gamma=0.9,block=32", "sparse", "sparse_prefill"),
                                                    ("sparse:gamma=0.95,block=32,estimate=int4", "estimate",
                                                     "lowbit_block_mass_triton")])
def test_kvfold_prefill_runs_the_model_prefill_through_the_kernel(monkeypatch, choice, module, kernel):
    """`KVFOLD_PREFILL=int8|sparse`: every layer's first prefill goes through the kernel, and the model's logits
    stay close to the SDPA prefill's."""
    import importlib

    from kvfold.api import prefill, use_kvfold_attention
    from kvfold.kernels import INT8_BLOCKS
    from kvfold.kernels.prefill import KEY_BLOCK, QUANT_BLOCK

    assert INT8_BLOCKS == {"block_m": QUANT_BLOCK, "block_n": KEY_BLOCK}  # the reference path reads the same blocks
    monkeypatch.setenv("KVFOLD_KERNELS", "triton")  # on the CPU: interpreted, small and short
    from kvfold.cache import KVFoldCache

    from ..conftest import make_tiny_llama

    model = make_tiny_llama(init=0.02, head_dim=32).to(DEVICE, torch.float16)
    ids = torch.randint(1, 256, (1, 96)).to(DEVICE)
    calls = []
    kernel_module = importlib.import_module(f"kvfold.kernels.{module}")
    original = getattr(kernel_module, kernel)
    monkeypatch.setattr(kernel_module, kernel, lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.inference_mode(), use_kvfold_attention(model):
        exact_logits = prefill(model, KVFoldCache(model.config, "snapkv:0.5"), ids)
        monkeypatch.setenv("KVFOLD_PREFILL", choice)
        kernel_logits = prefill(model, KVFoldCache(model.config, "snapkv:0.5"), ids)
    assert len(calls) == model.config.num_hidden_layers
    assert cosine(kernel_logits, exact_logits) > 0.999
    padded = torch.ones(2, 96, dtype=torch.long, device=DEVICE)
    padded[1, :10] = 0  # left padding: the kernels take no padding mask, so SDPA runs
    with torch.inference_mode(), use_kvfold_attention(model):
        prefill(model, KVFoldCache(model.config, "snapkv:0.5"), ids.repeat(2, 1), attention_mask=padded)
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("value, message", [("int4", "use sdpa, int8 or sparse"), ("sparse:gamma=2", "gamma"),
                                            ("sparse:block=48", "power of two"), ("sparse:gama=0.9", "unknown knob"),
                                            ("int8:block=64", "unknown knob"), ("sparse:tau=x", "not a number"),
                                            ("int8:pv=fp4", "pv must be 16 or fp8"), ("sparse:pv=fp8", "unknown knob"),
                                            ("sparse:estimate=int2", "estimate must be pooled, int4 or int8"),
                                            ("sparse:estimate=int4,rows=6", "rows must be a power of two"),
                                            ("sparse:rows=128", "rows must be a power of two <= block"),
                                            ("sparse:estimate=int4,reduce=mean", "reduce must be sum or max"),
                                            ("int8:estimate=int4", "unknown knob")])
def test_bad_kvfold_prefill_values_name_the_fix(monkeypatch, value, message):
    from kvfold.errors import KVFoldError
    from kvfold.kernels import PrefillAttention

    monkeypatch.setenv("KVFOLD_PREFILL", value)
    with pytest.raises(KVFoldError, match=message):
        PrefillAttention.from_env()
