import pytest

from kvfold import Compressor, KVFoldError


def test_none_has_no_knobs_and_refuses_a_ratio():
    compressor = Compressor.parse("none")
    assert not compressor.evicts and compressor.quantizer is None and compressor.spec == "none"
    assert compressor.scorer.knobs() == {}
    with pytest.raises(KVFoldError):
        Compressor.parse("none:ratio=0.5")
