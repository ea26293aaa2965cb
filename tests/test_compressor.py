import pytest

from kvfold import Compressor, KVFoldError
from kvfold.methods.adakv import AdaKVBudget
from kvfold.methods.kivi import KIVI
from kvfold.methods.snapkv import SnapKV


@pytest.mark.parametrize("spec", ["none", "snapkv:0.75", "snapkv:0.75@adakv", "adakv:0.5", "streaming:0.25",
                                  "streaming:sink=4,window=512", "kivi:2", "snapkv:0.75+kivi:4",
                                  "kivi:2,group=32,residual=64", "snapkv:0.5,window=16,every=8"])
def test_spec_round_trips(spec):
    compressor = Compressor.parse(spec)
    assert Compressor.parse(compressor.spec) == compressor


def test_composition_builds_the_right_parts():
    c = Compressor.parse("adakv:0.5,floor=0.1+kivi:2")
    assert c.scorer == SnapKV(ratio=0.5) and c.budget == AdaKVBudget(floor=0.1) and c.quantizer == KIVI(bits=2)
    assert c.spec == "snapkv:0.5@adakv:floor=0.1+kivi:2"
    assert Compressor.parse("kivi:8").scorer.name == "none"


@pytest.mark.parametrize("spec, message", [
    ("snpkv:0.5", "did you mean 'snapkv'"),
    ("snapkv:1.0", "ratio must be in [0, 1)"),
    ("snapkv:-0.1", "ratio must be in [0, 1)"),
    ("kivi:3", "bits must be 2, 4 or 8"),
    ("", "empty method spec"),
    (":0.5", "empty method name"),
    ("snapkv:0.5,0.3", "needs a name"),
    ("snapkv:0.5,windw=3", "did you mean 'window'"),
    ("snapkv:0.5+streaming:0.5", "two eviction methods"),
    ("kivi:2+kivi:4", "two quantizers"),
    ("kivi:2@adakv", "applies to an eviction method"),
    ("snapkv:0.5@kivi", "is not a budget"),
    ("snapkv:0.5,kernel=4", "kernel must be odd"),
    ("none:0.5", "needs a name"),
])
def test_bad_specs_get_clear_errors(spec, message):
    with pytest.raises(KVFoldError, match=None) as err:
        Compressor.parse(spec)
    assert message in str(err.value)
