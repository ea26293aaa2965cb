"""Ada-KV shares one layer budget across heads: ragged rows, a per-head floor, the same total as uniform."""

import torch

from kvfold import Compressor
from kvfold.methods.adakv import AdaKVBudget
from kvfold.methods.base import UniformBudget


def test_select_takes_the_global_top_with_a_floor_per_head():
    torch.manual_seed(0)
    scores = torch.rand(2, 4, 50)
    scores[:, 0] += 1.0  # head 0 dominates
    keep = torch.tensor([10, 20])
    mask = AdaKVBudget(floor=0.2).select(scores, keep)
    per_head = mask.sum(-1)
    assert per_head.sum(-1).tolist() == [40, 80]  # the layer budget: heads x per-head count
    assert (per_head >= torch.tensor([[2], [4]])).all()  # floor(0.2 * keep) each
    assert (per_head[:, 0] > per_head[:, 1:].amax(-1)).all()  # the dominant head got more
    # outside the floors, what is kept is the global top of the remaining scores
    uniform = UniformBudget().select(scores, keep)
    assert uniform.sum(-1).tolist() == [[10] * 4, [20] * 4]


def test_floor_one_is_uniform():
    scores = torch.rand(1, 3, 30)
    keep = torch.tensor([9])
    assert torch.equal(AdaKVBudget(floor=1.0).select(scores, keep), UniformBudget().select(scores, keep))


def test_spec_is_snapkv_with_the_adakv_budget():
    compressor = Compressor.parse("adakv:0.5")
    assert compressor.scorer.name == "snapkv" and isinstance(compressor.budget, AdaKVBudget)
    assert Compressor.parse("streaming:0.5@adakv").budget == AdaKVBudget()
