"""rotate: orthogonal per-layer matrices; rotated pages read back exactly (up to the quantizer); outlier
channels spread so that per-token value quantization loses less."""

import pytest
import torch

import kvfold
from kvfold.compressor import Compressor
from kvfold.errors import KVFoldError
from kvfold.layer import KVFoldLayer
from kvfold.methods.rotate import Rotate

from ..conftest import make_tiny_llama
from .helpers import run_spec


@pytest.mark.parametrize("basis, dim", [("hadamard", 64), ("hadamard", 128), ("random", 48)])
def test_matrices_are_orthogonal_and_differ_per_layer(basis, dim):
    rotation = Rotate(basis=basis)
    first, second = rotation.matrix(dim, 0), rotation.matrix(dim, 1)
    torch.testing.assert_close(first @ first.T, torch.eye(dim), atol=1e-5, rtol=0)
    assert not torch.allclose(first, second)
    assert torch.equal(first, Rotate(basis=basis).matrix(dim, 0))  # seeded: the same on every load


def test_hadamard_needs_a_power_of_two():
    with pytest.raises(KVFoldError, match="rotate:random"):
        Rotate().matrix(48, 0)


def stored_values(spec: str, values: torch.Tensor) -> torch.Tensor:
    """The values a layer store gives back after packing `values` [1, heads, tokens, dim] (keys random)."""
    layer = KVFoldLayer(Compressor.parse(spec))
    keys = torch.randn_like(values)
    layer.lazy_initialization(keys, values)
    tokens = values.shape[2]
    layer.seen = tokens
    layer._append_rows(keys, values, torch.arange(tokens), torch.ones(values.shape[:3], dtype=torch.bool))
    return torch.cat([chunk.values for chunk in layer.chunks()], dim=1)[:, :tokens].view_as(values)


def test_rotation_spreads_outlier_channels_for_per_token_quantization():
    torch.manual_seed(0)
    values = torch.randn(1, 2, 256, 64)
    values[..., [3, 40]] *= 30  # two outlier channels set every token's range
    plain = (stored_values("kivi:2,group=64,residual=0", values) - values).pow(2).mean()
    rotated = (stored_values("rotate+kivi:2,group=64,residual=0", values) - values).pow(2).mean()
    assert rotated < 0.5 * plain


def test_rotated_8bit_store_reads_back_the_values():
    torch.manual_seed(0)
    values = torch.randn(1, 2, 128, 64)
    restored = stored_values("rotate:random+kivi:8,group=32,residual=0", values)
    assert (restored - values).abs().max() < 0.05  # 8-bit steps, not a wrong basis (which errs by O(1))


def test_logits_close_and_the_matrix_is_counted(tiny_llama):
    model = make_tiny_llama(init=0.02)
    torch.manual_seed(1)
    ids = torch.randint(1, 256, (1, 200))
    with torch.no_grad():
        reference = model(ids).logits[0, -1]
        with kvfold.compress(model, "rotate+fp8"):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.nn.functional.cosine_similarity(out.logits[0][0], reference, dim=0) >= 0.9999
    ids = torch.randint(1, 256, (1, 96))
    plain, rotated = run_spec(tiny_llama, "kivi:4", ids), run_spec(tiny_llama, "rotate+kivi:4", ids)
    dim = tiny_llama.config.head_dim
    assert rotated.nbytes() - plain.nbytes() == len(rotated.layers) * dim * dim * 4


def test_spec_round_trip_and_errors():
    assert Compressor.parse("snapkv:0.5+rotate:random,seed=3+kivi:2").spec == "snapkv:0.5+rotate:random,seed=3+kivi:2"
    with pytest.raises(KVFoldError, match="add one"):
        Compressor.parse("rotate")
    with pytest.raises(KVFoldError, match="at most one rotation"):
        Compressor.parse("rotate+rotate:random+kivi:4")
    with pytest.raises(KVFoldError, match="basis must be"):
        Compressor.parse("rotate:fourier+kivi:4")
