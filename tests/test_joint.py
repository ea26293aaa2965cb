"""`JointCache`: several caches decoded in one batched forward give each request the tokens it gets alone."""

import pytest
import torch

from kvfold.api import prefill, use_kvfold_attention
from kvfold.cache import KVFoldCache
from kvfold.errors import KVFoldError
from kvfold.joint import JointCache
from kvfold.models import cache_keyword

SPECS = ["none", "snapkv:0.5", "kivi:4,group=16,residual=16", "streaming:0.5,every=8"]


def _step(model, cache, token: int, position: int) -> torch.Tensor:
    return model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]), use_cache=True,
                 **{cache_keyword(model): cache}).logits[0, -1]


def test_joint_steps_equal_each_cache_alone(tiny_llama):
    """Prompts of different lengths and four methods (one evicting while it decodes), 24 steps: the joint
    forward's logits equal each cache's own forward, and so do the greedy tokens and the bytes each cache holds."""
    torch.manual_seed(0)
    prompts = [torch.randint(1, 256, (1, n)) for n in (70, 33, 101, 50)]
    with torch.inference_mode(), use_kvfold_attention(tiny_llama):
        alone = [KVFoldCache(tiny_llama.config, spec) for spec in SPECS]
        joint = [KVFoldCache(tiny_llama.config, spec) for spec in SPECS]
        first = [prefill(tiny_llama, c, p)[0] for c, p in zip(alone, prompts)]
        for c, p in zip(joint, prompts):
            prefill(tiny_llama, c, p)
        tokens = [[int(logits.argmax())] for logits in first]
        joint_tokens = [list(t) for t in tokens]
        for _ in range(24):
            solo = [_step(tiny_llama, c, t[-1], c.get_seq_length()) for c, t in zip(alone, tokens)]
            batch = JointCache(joint)
            ids = torch.tensor([[t[-1]] for t in joint_tokens])
            together = tiny_llama(input_ids=ids, position_ids=batch.positions("cpu"), use_cache=True,
                                  **{cache_keyword(tiny_llama): batch}).logits[:, -1]
            torch.testing.assert_close(together, torch.stack(solo), rtol=1e-3, atol=5e-4)  # batched matrix products round differently
            for t, logits in zip(tokens, solo):
                t.append(int(logits.argmax()))
            for t, logits in zip(joint_tokens, together):
                t.append(int(logits.argmax()))
        assert joint_tokens == tokens
        assert [c.nbytes() for c in joint] == [c.nbytes() for c in alone]
        assert [c.get_seq_length() for c in joint] == [p.shape[1] + 24 for p in prompts]


def test_joint_cache_refuses_what_it_cannot_step(tiny_llama):
    with torch.inference_mode(), use_kvfold_attention(tiny_llama):
        with pytest.raises(KVFoldError, match="at least one cache"):
            JointCache([])
        two_rows = KVFoldCache(tiny_llama.config, "none")
        prefill(tiny_llama, two_rows, torch.randint(1, 256, (2, 10)))
        with pytest.raises(KVFoldError, match="batch 1"):
            JointCache([two_rows])
        one = KVFoldCache(tiny_llama.config, "none")
        prefill(tiny_llama, one, torch.randint(1, 256, (1, 10)))
        batch = JointCache([one])
        with pytest.raises(KVFoldError, match="one token"):
            tiny_llama(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[10, 11]]),
                       use_cache=True, **{cache_keyword(tiny_llama): batch})
