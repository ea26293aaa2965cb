"""Task-KV: the head whose attention output stands apart keeps its whole row, the others their light share; the
layer keeps the uniform total; the semantic distance equals a direct computation."""

import pytest
import torch

from kvfold import Compressor
from kvfold.errors import KVFoldError
from kvfold.methods.base import ScoreInputs, UniformBudget
from kvfold.methods.taskkv import TaskKVBudget, semantic_distance

from .helpers import run_spec


def _inputs(odd_head: int, heads: int = 4, tokens: int = 40) -> ScoreInputs:
    """KV heads with similar values except `odd_head`, whose values are large and point elsewhere."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, heads, tokens, 8, generator=gen)
    values = torch.randn(1, 1, tokens, 8, generator=gen).expand(1, heads, tokens, 8).clone()
    values[0, odd_head] = 10.0 + torch.randn(tokens, 8, generator=gen)
    queries = torch.randn(1, 2 * heads, 4, 8, generator=gen)
    positions = torch.arange(tokens).expand(1, heads, tokens)
    return ScoreInputs(queries, torch.arange(tokens - 4, tokens), keys, values, positions,
                       torch.ones(1, heads, tokens, dtype=torch.bool), 8 ** -0.5)


def test_semantic_distance_is_the_distance_of_mean_attention_outputs():
    x = _inputs(odd_head=2)
    got = semantic_distance(x, probe=3)
    outputs = []
    for head in range(4):
        q = x.queries[0, 2 * head:2 * head + 2, -3:]  # the GQA group's last 3 queries
        logits = q @ x.keys[0, head].T * x.scale
        visible = x.positions[0, head].view(1, 1, -1) <= x.query_positions[-3:].view(1, -1, 1)
        attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        outputs.append((attn @ x.values[0, head]).mean(dim=(0, 1)))
    outputs = torch.stack(outputs)
    torch.testing.assert_close(got[0], (outputs - outputs.mean(0)).norm(dim=-1))
    assert int(got.argmax()) == 2


def test_the_far_head_keeps_everything_and_the_total_is_uniform():
    x = _inputs(odd_head=1)
    scores = torch.rand(1, 4, 40, dtype=torch.float64)
    keep = torch.tensor([16])  # uniform: 64 tokens in the layer
    mask = TaskKVBudget(light=0.25).select(scores, keep, inputs=x)
    per_head = mask.sum(-1)[0].tolist()
    assert per_head[1] == 40  # the heterogeneous head: its whole row
    assert sum(per_head) == int(UniformBudget().select(scores, keep).sum())
    light = [per_head[h] for h in (0, 2, 3)]
    assert sorted(light) == [4, 4, 16]  # ceil(0.25 * 16) each; of the 48 spare, 36 fill head 1, 12 the next farthest
    for head in range(4):  # each row keeps its highest scores
        k = per_head[head]
        assert set(torch.nonzero(mask[0, head]).flatten().tolist()) == set(scores[0, head].topk(k).indices.tolist())


def test_light_share_never_drops_protected_tokens():
    x = _inputs(odd_head=0)
    scorer = Compressor.parse("snapkv:0.5,window=6@taskkv:light=0.0").scorer
    scores = scorer.score(x)
    mask = TaskKVBudget(light=0.0).select(scores, scorer.keep_count(torch.tensor([40])), inputs=x)
    assert mask[0, :, -6:].all()


def test_rows_are_ragged_on_tiny_llama_with_the_uniform_total(tiny_llama):
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    cache = run_spec(tiny_llama, "taskkv:0.6", ids, steps=2)
    uniform = run_spec(tiny_llama, "snapkv:0.6", ids, steps=2)
    assert cache.stored_tokens() == uniform.stored_tokens()
    assert cache.nbytes() < 0.6 * run_spec(tiny_llama, "none", ids, steps=2).nbytes()
    lengths = torch.stack([layer.row_lengths()[0] for layer in cache.layers])
    assert (lengths.amax(-1) > lengths.amin(-1)).any()


def test_spec_and_bad_knobs():
    compressor = Compressor.parse("taskkv:0.5")
    assert compressor.scorer.name == "snapkv" and isinstance(compressor.budget, TaskKVBudget)
    assert Compressor.parse("h2o:0.75@taskkv:light=0.1").spec == "h2o:0.75@taskkv:light=0.1"
    with pytest.raises(KVFoldError, match="light must be in"):
        Compressor.parse("snapkv:0.5@taskkv:light=1.5")
    with pytest.raises(KVFoldError, match="probe must be an integer"):
        Compressor.parse("snapkv:0.5@taskkv:probe=0")
