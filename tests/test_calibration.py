"""`kvfold calibrate` and the OSCAR rotation: fitted matrices are orthogonal and equalize the channels they are fitted
for, files carry the model's identity, a store read back through separate key/value rotations is exact up to the
quantizer, and the clip ratios fitted on data lower the quantization error they are fitted for."""

import importlib.util
import os

import pytest
import torch

import kvfold
from kvfold.calibration import bit_reversal, fit_oscar, load_calibration, oscar_rotation, per_token_error, \
    save_calibration
from kvfold.compressor import Compressor
from kvfold.errors import KVFoldError
from kvfold.kernels.reference import paged_attention
from kvfold.layer import KVFoldLayer
from kvfold.methods.rotate import clip_rows

from .conftest import make_tiny_llama
from .methods.helpers import next_token_cosines


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A calibration of the tiny llama (head_dim 16) on 3 random passages."""
    model = make_tiny_llama(init=0.02)
    torch.manual_seed(0)
    passages = [torch.randint(1, 256, (1, 120)) for _ in range(3)]
    seen = []
    result = fit_oscar(model, passages, bits=2, on_sample=seen.append)
    assert seen == [1, 2, 3]
    path = save_calibration(result, tmp_path_factory.mktemp("calib") / "tiny.safetensors", "tiny-llama")
    return path, result


def test_bit_reversal():
    assert bit_reversal(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]
    assert sorted(bit_reversal(64).tolist()) == list(range(64))


def test_oscar_rotation_is_orthogonal_and_equalizes_the_channels():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0]
    covariance = basis @ torch.diag(torch.logspace(2, -2, 32, dtype=torch.float64)) @ basis.T
    rotation = oscar_rotation(covariance).double()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)
    turned = rotation.T @ covariance @ rotation  # the covariance of x @ R
    torch.testing.assert_close(turned.diagonal(), torch.full((32,), covariance.trace().item() / 32,
                                                             dtype=torch.float64), rtol=1e-6, atol=1e-8)


def test_clip_rows_clamps_at_the_row_quantile():
    x = torch.tensor([[1.0, -8.0, 3.0, 2.0], [0.5, 0.25, -0.125, 4.0]])
    assert torch.equal(clip_rows(x, 1.0), x)
    assert clip_rows(x, 0.5).tolist() == [[1.0, -3.0, 3.0, 2.0], [0.5, 0.25, -0.125, 0.5]]


def test_file_round_trip_and_identity(calibration, tiny_llama):
    path, result = calibration
    tensors, metadata = load_calibration(path)
    assert metadata["model"]["name"] == "tiny-llama" and metadata["model"]["layers"] == 3
    assert metadata["kvfold"] == kvfold.__version__ and int(metadata["tokens"]) == 360
    for name, tensor in result["tensors"].items():
        assert torch.equal(tensors[name], tensor)
    assert ((tensors["key_clip"] > 0.5) & (tensors["key_clip"] <= 1)).all()
    kvfold.make_cache(tiny_llama, f"rotate:oscar,calib={path}+kivi:2")  # the same architecture: accepted
    other = make_tiny_llama(layers=4)
    with pytest.raises(KVFoldError, match="fitted on model 'tiny-llama'"):
        kvfold.make_cache(other, f"rotate:oscar,calib={path}+kivi:2")


def test_bad_files_and_specs_are_clear_errors(tmp_path):
    with pytest.raises(KVFoldError, match="does not exist"):
        Compressor.parse(f"rotate:oscar,calib={tmp_path / 'none.safetensors'}+kivi:2")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KVFoldError, match="not a readable safetensors"):
        Compressor.parse(f"rotate:oscar,calib={tmp_path / 'junk.safetensors'}+kivi:2")
    with pytest.raises(KVFoldError, match="needs calib=FILE"):
        Compressor.parse("rotate:oscar+kivi:2")


def filled(spec: str, seed: int = 0):
    torch.manual_seed(seed)
    layer = KVFoldLayer(Compressor.parse(spec))
    keys, values = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    layer.lazy_initialization(keys, values)
    layer.seen = 96
    layer._append_rows(keys, values, torch.arange(96), torch.ones(1, 2, 96, dtype=torch.bool))
    return layer, keys, values


def test_separate_key_and_value_rotations_read_back_exactly_up_to_the_quantizer(calibration):
    path, _ = calibration
    layer, keys, values = filled(f"rotate:oscar,calib={path},clip=false+kivi:8,group=16,residual=0")
    assert not torch.allclose(layer.rotation, layer.value_rotation)
    chunk = next(iter(layer.chunks()))
    assert (chunk.keys.view(2, 96, 16) - keys[0]).abs().max() < 0.05
    assert (chunk.values.view(2, 96, 16) - values[0]).abs().max() < 0.05
    query = torch.randn(2, 2, 16)
    plain, _, _ = filled("kivi:8,group=16,residual=0")
    exact = paged_attention(query, torch.full((2,), 95), plain.chunks(), 0.25)
    rotated = paged_attention(query, torch.full((2,), 95), layer.chunks(), 0.25)
    torch.testing.assert_close(rotated, exact, atol=0.02, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernel runs here on CPU tensors, under TRITON_INTERPRET=1 (tests/kernels covers GPUs)")
def test_decode_kernel_reads_oscar_pages(calibration):
    from kvfold.kernels.decode import paged_decode

    path, _ = calibration
    layer, _, _ = filled(f"rotate:oscar,calib={path}+kivi:4,group=16,residual=16")
    query = torch.randn(2, 2, 16)
    expected = paged_attention(query, torch.full((2,), 95), layer.chunks(), 0.25)
    got = paged_decode(query, layer.kernel_parts(), 95, 0.25, pages_per_split=2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fitted_clip_lowers_the_error_it_is_fitted_for():
    """On heavy-tailed rows the per-row clip at 2 bits beats no clip, as the fit assumes."""
    torch.manual_seed(0)
    rows = torch.distributions.StudentT(3.0).sample((4096, 64))
    error = {r: (per_token_error(clip_rows(rows, r), 2) + clip_rows(rows, r) - rows).pow(2).mean() for r in (1.0, 0.9)}
    assert error[0.9] < 0.8 * error[1.0]


def test_oscar_logits_close_on_the_tiny_model(calibration, tiny_llama):
    path, _ = calibration
    spec = f"rotate:oscar,calib={path}+kivi:4,group=16,residual=16"
    assert next_token_cosines([spec])[spec] >= 0.999


def test_cli_calibrates_a_local_model_end_to_end(tmp_path, embedded_tokenizer):
    """`kvfold calibrate` on a local folder (a tiny random Llama with the embedded tokenizer's vocabulary): both
    methods write files that load and carry the model's identity; xkv's ranks follow each group's width."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(embedded_tokenizer),
                         max_position_embeddings=1024)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    embedded_tokenizer.save_pretrained(model_dir)
    for method, name in (("rotate:oscar", "oscar.safetensors"), ("xkv:0.5,layers=2", "xkv.safetensors")):
        result = subprocess.run([sys.executable, "-m", "kvfold", "calibrate", "--model", str(model_dir), "--method",
                                 method, "--samples", "2", "--length", "128", "--out", str(tmp_path / name)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"calib={tmp_path / name}" in result.stdout.replace("\n", "")
        tensors, metadata = load_calibration(tmp_path / name, "xkv" if method.startswith("xkv") else method)
        assert metadata["model"]["layers"] == 3 and metadata["samples"] == "2"
    assert tensors["groups.0.key_basis"].shape == (32, 64) and tensors["groups.1.key_basis"].shape == (16, 32)
