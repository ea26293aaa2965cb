"""`JointCache`: several caches decoded in one batched forward give each request the tokens it gets alone."""

import importlib.util
import os

import pytest
import torch

from kvfold.api import prefill, use_kvfold_attention
from kvfold.cache import KVFoldCache
from kvfold.errors import KVFoldError
from kvfold.joint import JointCache
from kvfold.models import cache_keyword

SPECS = ["none", "snapkv:0.5", "kivi:4,group=16,residual=16", "streaming:0.5,every=8"]
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"  # compiled kernels


def _step(model, cache, token: int, position: int) -> torch.Tensor:
    return model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]), use_cache=True,
                 **{cache_keyword(model): cache}).logits[0, -1]


def _decode_joined(model, caches, tokens: list[list[int]], steps: list[int], segments: list, device="cpu") -> list:
    """Greedy joint steps as the serve engine runs them: request i takes `steps[i]` forwards (then leaves); a
    request with fast segments begins (and refreshes: forks share pools) before each step and advances after it.
    Appends each request's tokens to `tokens[i]`; returns the logits of every step."""
    seen = []
    for step in range(max(steps)):
        live = [i for i, n in enumerate(steps) if step < n]
        running = [segments[i] for i in live if segments[i] is not None]
        for group in running:
            group.begin()
        for group in running:
            group.refresh()
        batch = JointCache([caches[i] for i in live])
        out = model(input_ids=torch.tensor([[tokens[i][-1]] for i in live], device=device),
                    position_ids=batch.positions(device), use_cache=True,
                    **{cache_keyword(model): batch}).logits[:, -1]
        seen.append(out)
        for i, row in zip(live, out):
            tokens[i].append(int(row.argmax()))
            if segments[i] is not None:
                segments[i].advance()
                if step == steps[i] - 1:
                    segments[i].close()
    return seen


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


def test_joint_steps_through_fast_segments_equal_the_normal_path(tiny_llama):
    """`kvfold serve`'s fast decode: each cache in the joint step runs the fast loop's segments (in-place pages,
    its own clock; on the CPU the reference reads them). Same logits and tokens as the normal path, a request that
    leaves mid-segment included, and the same pages read once the host has caught up (the pools may keep some of
    the segments' reserve: `nbytes` can be higher)."""
    from kvfold.fastpath import Segments

    torch.manual_seed(1)
    prompts = [torch.randint(1, 256, (1, n)) for n in (70, 33, 101, 50)]
    steps = [24, 10, 24, 17]  # forwards per request: the second leaves mid-segment
    runs = {}
    with torch.inference_mode(), use_kvfold_attention(tiny_llama):
        for fast in (False, True):
            caches = [KVFoldCache(tiny_llama.config, spec) for spec in SPECS]
            tokens = [[int(prefill(tiny_llama, c, p)[0].argmax())] for c, p in zip(caches, prompts)]
            segments = [Segments(list(c.layers), "cpu", n) if fast else None for c, n in zip(caches, steps)]
            logits_seen = _decode_joined(tiny_llama, caches, tokens, steps, segments)
            assert all(layer.fast is None for c in caches for layer in c.layers)
            runs[fast] = (tokens, logits_seen, [c.referenced_nbytes() for c in caches],
                          [c.get_seq_length() for c in caches])
    (tokens, logits, nbytes, seen), (fast_tokens, fast_logits, fast_nbytes, fast_seen) = runs[False], runs[True]
    assert fast_tokens == tokens and fast_nbytes == nbytes and fast_seen == seen
    for a, b in zip(logits, fast_logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fast_segments_of_forks_that_share_pools_read_them_as_they_are(monkeypatch, merge_in_pytorch):
    """Two requests forked from one prefix share its page pools; a third request admitted meanwhile prefills into
    them and grows them under the first two's segments, which must refresh their kernel view (`Segments.refresh`,
    as the serve engine does before every step). Through the Triton kernel (interpreted): the normal path's logits."""
    from kvfold.fastpath import Segments

    from .conftest import make_tiny_llama

    model = make_tiny_llama(layers=2, head_dim=64).to(DEVICE)
    prefix = torch.randint(1, 256, (1, 40), device=DEVICE)
    turns = [torch.randint(1, 256, (1, n), device=DEVICE) for n in (5, 9)]
    runs = {}
    with torch.inference_mode(), use_kvfold_attention(model):
        for fast in (False, True):
            monkeypatch.setenv("KVFOLD_KERNELS", "triton" if fast else "reference")
            parent = KVFoldCache(model.config, "none")
            prefill(model, parent, prefix)
            caches = [parent.fork() for _ in turns]
            tokens = [[int(prefill(model, c, t, start=40)[0].argmax())] for c, t in zip(caches, turns)]
            segments = [Segments(list(c.layers), DEVICE, 6) for c in caches] if fast else []
            moved, seen = False, []
            for step in range(6):
                pointer = parent.layers[0].full.pool.tensors["k"].data_ptr()
                for s in segments:
                    s.begin()
                if step == 3:  # the engine prefills an admitted request between decode steps
                    prefill(model, parent.fork(), torch.randint(1, 256, (1, 300), device=DEVICE), start=40)
                moved |= parent.layers[0].full.pool.tensors["k"].data_ptr() != pointer
                for s in segments:
                    s.refresh()
                batch = JointCache(caches)
                out = model(input_ids=torch.tensor([[t[-1]] for t in tokens], device=DEVICE),
                            position_ids=batch.positions(DEVICE),
                            use_cache=True, **{cache_keyword(model): batch}).logits[:, -1]
                seen.append(out)
                for t, row in zip(tokens, out):
                    t.append(int(row.argmax()))
                for s in segments:
                    s.advance()
            for s in segments:
                s.close()
            runs[fast] = tokens, seen
            assert moved  # the shared pool grew under the running requests' segments
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_requests_on_one_pool_set_decode_in_one_kernel_launch(monkeypatch, merge_in_pytorch):
    """A server's caches draw on one `PoolSet`: requests of one method then attend in one `joint_step` per layer
    (one token write and one decode launch for all their rows), a request of another method alone. Through the
    Triton kernel (interpreted), with packing ticks and a request leaving mid-segment: the same tokens and logits as
    each cache read by the reference one by one, without a pool set."""
    from kvfold import fastpath, joint
    from kvfold.fastpath import Segments
    from kvfold.kernels import decode
    from kvfold.pages import PoolSet

    from .conftest import make_tiny_llama

    model = make_tiny_llama(layers=2, head_dim=64).to(DEVICE)
    specs = ["none", "kivi:4,group=16,residual=8", "none", "kivi:4,group=16,residual=8", "snapkv:0.5"]
    prompts = [torch.randint(1, 256, (1, n), device=DEVICE) for n in (37, 60, 21, 47, 45)]
    steps = [8, 8, 3, 8, 8]  # the kivi requests pack a group at steps 4 and 1; the third leaves mid-segment
    monkeypatch.setattr(decode, "INVARIANT_SPLIT_TOKENS", 64)  # the interpreter runs every page slot of a split
    joined = []
    monkeypatch.setattr(joint, "joint_step", lambda layers, *a: joined.append(len(layers)) or
                        fastpath.joint_step(layers, *a))
    runs = {}
    with torch.inference_mode(), use_kvfold_attention(model):
        for shared in (False, True):
            monkeypatch.setenv("KVFOLD_KERNELS", "triton" if shared else "reference")
            pools = PoolSet() if shared else None
            caches = [KVFoldCache(model.config, spec, pools=pools) for spec in specs]
            tokens = [[int(prefill(model, c, p)[0].argmax())] for c, p in zip(caches, prompts)]
            segments = [Segments(list(c.layers), DEVICE, n) if shared else None for c, n in zip(caches, steps)]
            packed = [int(caches[i].layers[0].packed.lengths.sum()) for i in (1, 3)]
            seen = _decode_joined(model, caches, tokens, steps, segments, DEVICE)
            runs[shared] = tokens, seen, [c.get_seq_length() for c in caches]
            after = [int(caches[i].layers[0].packed.lengths.sum()) for i in (1, 3)]
            assert all(a > b for a, b in zip(after, packed))  # both packed a group while decoding
            if shared:
                assert caches[0].layers[1].full.pool is caches[2].layers[1].full.pool
                assert caches[1].layers[1].packed.pool is caches[3].layers[1].packed.pool
    # per layer and step: the two kivi requests, the two "none" ones until one leaves, the snapkv one alone
    both, leaves = max(steps), steps[2]
    assert joined.count(2) == 2 * (both + leaves) and joined.count(1) == 2 * (both + both - leaves)
    assert runs[True][0] == runs[False][0] and runs[True][2] == runs[False][2]
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (run there with TRITON_INTERPRET=0)")
@pytest.mark.parametrize("spec", ["none", "kivi:4,group=16,residual=16"])
def test_a_joint_step_replayed_from_a_cuda_graph_equals_the_eager_step(spec):
    """`JointGraphs` (the server's joint step on a GPU): captured once the same requests have stepped together,
    replayed while they keep doing so, captured again when one leaves or a segment moves a table or pool: the same
    tokens and logits as the eager joint step."""
    from kvfold.fastpath import Segments
    from kvfold.joint import JointGraphs
    from kvfold.pages import PoolSet

    from .conftest import make_tiny_llama

    model = make_tiny_llama(layers=2, head_dim=64).to(DEVICE)
    prompts = [torch.randint(1, 256, (1, n), device=DEVICE) for n in (37, 60, 21)]
    steps = [24, 24, 9]  # the third leaves; kivi's segments end every 16 tokens
    runs = {}
    with torch.inference_mode(), use_kvfold_attention(model):
        for graphs in (False, True):
            pools = PoolSet()
            caches = [KVFoldCache(model.config, spec, pools=pools) for _ in prompts]
            tokens = [[int(prefill(model, c, p)[0].argmax())] for c, p in zip(caches, prompts)]
            segments = [Segments(list(c.layers), DEVICE, n) for c, n in zip(caches, steps)]
            runner = JointGraphs(model, torch.device(DEVICE)) if graphs else None
            seen = []
            for step in range(max(steps)):
                live = [i for i, n in enumerate(steps) if step < n]
                moved = not all([segments[i].begin() for i in live])
                moved |= any([segments[i].refresh() for i in live])
                ids = torch.tensor([[tokens[i][-1]] for i in live], device=DEVICE)
                positions = torch.tensor([[segments[i].seen] for i in live], device=DEVICE)
                group = [caches[i] for i in live]
                if runner is not None:
                    assert JointGraphs.applies(group)
                    out = runner.step(group, ids, positions, moved).clone()
                else:
                    out = model(input_ids=ids, position_ids=positions, use_cache=True,
                                **{cache_keyword(model): JointCache(group)}).logits[:, -1]
                seen.append(out)
                for i, row in zip(live, out):
                    tokens[i].append(int(row.argmax()))
                    segments[i].advance()
                    if step == steps[i] - 1:
                        segments[i].close()
            runs[graphs] = tokens, seen, runner
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    runner = runs[True][2]
    assert runner.failed is None and runner.captures >= 2 and runner.replays >= 10
