"""TOVA keeps the tokens the newest query attends to most (mean over the layer's query heads, so every KV head keeps
the same ones), and by default re-applies its budget after every decoded token."""

import pytest
import torch

from kvfold import Compressor, KVFoldError
from kvfold.methods.base import ScoreInputs, UniformBudget
from kvfold.methods.tova import TOVA

from .helpers import ceil_half, eager_attentions, embedded_run, kept, none_bytes, run_spec, uniform_rows


def inputs(tokens=30, q_heads=4, kv_heads=2, dim=8, window=3, seed=0, positions=None) -> ScoreInputs:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, kv_heads, tokens, dim, generator=g) * 2
    queries = torch.randn(1, q_heads, window, dim, generator=g) * 2
    positions = torch.arange(tokens).expand(1, kv_heads, tokens) if positions is None else positions
    newest = int(positions.max())
    return ScoreInputs(queries, torch.arange(newest - window + 1, newest + 1), keys, torch.randn_like(keys),
                       positions, torch.ones(1, kv_heads, tokens, dtype=torch.bool), dim ** -0.5)


def newest_query_attention(x: ScoreInputs) -> torch.Tensor:
    """Reference: [q_heads, tokens] softmax of the last query of each query head (all keys visible)."""
    q_heads, kv_heads = x.queries.shape[1], x.keys.shape[1]
    keys = x.keys[0].repeat_interleave(q_heads // kv_heads, dim=0)  # [q_heads, tokens, dim]
    logits = torch.einsum("hd,htd->ht", x.queries[0, :, -1], keys) * x.scale
    return torch.softmax(logits, dim=-1)


def test_keeps_the_top_of_the_newest_querys_attention_averaged_over_all_heads():
    x = inputs()
    scorer = TOVA(ratio=0.6)  # window=1: only the newest token is protected
    mask = UniformBudget().select(scorer.score(x), scorer.keep_count(torch.tensor([30])))
    votes = newest_query_attention(x).mean(dim=0)  # one score per token for the whole layer
    votes[-1] = float("inf")
    want = set(votes.topk(12).indices.tolist())  # ceil(0.4 * 30) = 12
    for head in range(2):
        assert set(torch.nonzero(mask[0, head]).flatten().tolist()) == want
    torch.testing.assert_close(scorer.raw_score(x)[0, 0], newest_query_attention(x).mean(dim=0))


def test_per_head_scores_each_kv_head_by_its_own_group():
    x = inputs(seed=1)
    attn = newest_query_attention(x).view(2, 2, 30).mean(dim=1)
    torch.testing.assert_close(TOVA(per_head=True).raw_score(x)[0], attn)


def test_only_the_newest_query_counts():
    x = inputs(seed=2)
    older = x.queries.clone()
    older[:, :, :-1] = torch.randn_like(older[:, :, :-1]) * 10
    y = ScoreInputs(older, x.query_positions, x.keys, x.values, x.positions, x.valid, x.scale)
    torch.testing.assert_close(TOVA().raw_score(x), TOVA().raw_score(y))


def test_ragged_rows_average_per_position_not_per_slot():
    """After a ragged budget (adakv) rows hold different tokens: a token's layer score is the attention every query
    head gave it, summed where that head's row still holds it, over the number of query heads."""
    positions = torch.stack([torch.arange(0, 20), torch.arange(0, 40, 2)]).unsqueeze(0)  # [1, 2, 20]
    x = inputs(tokens=20, window=1, seed=3, positions=positions)
    keys = x.keys[0]
    per_head = []
    for h in range(4):  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        row = h // 2
        logits = keys[row] @ x.queries[0, h, -1] * x.scale
        visible = positions[0, row] <= 38
        per_head.append((row, torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)))
    total = {}
    for row, attn in per_head:
        for slot, pos in enumerate(positions[0, row].tolist()):
            total[pos] = total.get(pos, 0.0) + float(attn[slot])
    want = torch.tensor([[total[p] / 4 for p in positions[0, row].tolist()] for row in range(2)])
    torch.testing.assert_close(TOVA().raw_score(x)[0], want)


def test_prefill_keeps_an_independent_top_k_of_the_last_prompt_query(tiny_llama):
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(21))
    cache = run_spec(tiny_llama, "tova:0.6", ids)
    for layer, (attn, got) in enumerate(zip(eager_attentions(tiny_llama, ids), kept(cache))):
        votes = attn[0, :, -1].float().mean(dim=0)  # the last query, mean over the 4 query heads
        votes[-1] = float("inf")
        want = votes.topk(80).indices.sort().values  # ceil(0.4 * 200) = 80
        assert all(torch.equal(row, want) for row in got), f"layer {layer}"


def test_ratio_is_re_applied_after_every_decoded_token(tiny_llama):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(22))
    for steps in (1, 4):
        cache = run_spec(tiny_llama, "tova:0.5", ids, steps=steps)
        uniform_rows(cache, ceil_half(300 + steps))
        for layer in kept(cache):
            assert torch.equal(layer[0], layer[1])  # the layer-wise policy: both KV heads hold the same tokens
    assert cache.nbytes() < none_bytes(tiny_llama, ids, steps=4)


def test_with_a_quantizer_the_newest_tokens_are_evicted_before_they_are_packed(tiny_llama):
    """Packed tokens are final: each step evicts from the float16 tail, within the budget less what is packed."""
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(24))
    cache = run_spec(tiny_llama, "tova:0.5+kivi:4,group=16,residual=32", ids, steps=20)
    for layer in cache.layers:
        assert layer.row_lengths().flatten().tolist() == [ceil_half(320)] * layer.kv_heads
        assert int(layer.packed.lengths.min()) > 0 and int(layer.full.lengths.max()) <= 32 + 15
    assert cache.nbytes() < 0.5 * run_spec(tiny_llama, "tova:0.5", ids, steps=20).nbytes()


def test_fixed_multi_state_size_while_decoding(tiny_llama):
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(23))
    cache = run_spec(tiny_llama, "tova:budget=40", ids, steps=6)
    uniform_rows(cache, 40)
    for layer in kept(cache):
        assert 125 in layer[0].tolist()  # the newest token is protected by the default window=1


def test_defaults_and_bad_knobs():
    scorer = Compressor.parse("tova:0.5").scorer
    assert (scorer.every, scorer.window, scorer.per_head) == (1, 1, False) and scorer.query_aware
    assert Compressor.parse("tova:0.5+kivi:4").quantizer is not None  # decode-time eviction over the float16 tail
    with pytest.raises(KVFoldError, match="per_head must be true or false"):
        Compressor.parse("tova:0.5,per_head=2")


@pytest.mark.slow
def test_embedded_model_generates_with_fewer_bytes(embedded):
    answer, full = embedded_run(*embedded, "tova:0.5")
    assert answer.tokens and answer.kv_bytes < 0.75 * full.kv_bytes
