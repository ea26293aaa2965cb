"""Teacher-forced perplexity through a compressed cache: `none` gives the model's own loss over the text; eviction
changes it only through what it dropped; bad input is a clear error; `kvfold bench --tasks ppl` writes its rows."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console

import kvfold
from kvfold.bench.report import load_report
from kvfold.bench.runner import BenchConfig, run_bench
from kvfold.errors import KVFoldError


class ByteTokenizer:
    """Token ids are the text's bytes (the tiny model's vocabulary is 256)."""

    def __call__(self, text: str, **_) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(12))


def own_loss(model, ids: list[int], eval_tokens: int) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -eval_tokens - 1:-1].float()
    target = torch.tensor(ids[-eval_tokens:])
    nll = torch.nn.functional.cross_entropy(logits, target).item()
    return nll, (logits.argmax(-1) == target).float().mean().item()


def test_none_is_the_models_own_loss_over_the_text(tiny_llama):
    ids = ByteTokenizer()(TEXT)["input_ids"]
    got = kvfold.teacher_forced(tiny_llama, ByteTokenizer(), TEXT, method="none", eval_tokens=100)
    nll, accuracy = own_loss(tiny_llama, ids, 100)
    assert got.nll == pytest.approx(nll, abs=1e-4) and got.accuracy == pytest.approx(accuracy)
    assert got.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert (got.eval_tokens, got.context_tokens) == (100, len(ids) - 100)
    chunked = kvfold.teacher_forced(tiny_llama, ByteTokenizer(), TEXT, method="none", eval_tokens=100, prefill_chunk=128)
    assert chunked.nll == pytest.approx(nll, abs=1e-4)


def test_eviction_changes_the_loss_and_holds_fewer_bytes(tiny_llama):
    plain = kvfold.teacher_forced(tiny_llama, ByteTokenizer(), TEXT, method="none", eval_tokens=64)
    evicted = kvfold.teacher_forced(tiny_llama, ByteTokenizer(), TEXT, method="snapkv:0.75", eval_tokens=64)
    assert math.isfinite(evicted.nll) and evicted.nll != pytest.approx(plain.nll, abs=1e-4)
    assert evicted.kv_bytes < 0.5 * plain.kv_bytes


@pytest.mark.parametrize("eval_tokens", [0, -3, 10_000, 2.5, True])
def test_bad_eval_tokens(tiny_llama, eval_tokens):
    with pytest.raises(KVFoldError, match="eval_tokens must be an integer"):
        kvfold.teacher_forced(tiny_llama, ByteTokenizer(), TEXT, eval_tokens=eval_tokens)


def test_text_past_the_context_is_refused(tiny_llama):
    with pytest.raises(KVFoldError, match="past the model's context of 1024"):
        kvfold.teacher_forced(tiny_llama, ByteTokenizer(), "x" * 1100, eval_tokens=10)


def test_bench_ppl_rows_and_report(embedded_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(embedded_tokenizer),
                         max_position_embeddings=4096, attn_implementation="sdpa")
    lm = LlamaForCausalLM(config).eval()
    sweep = BenchConfig(out=tmp_path, methods=("none", "snapkv"), ratios=(0.75,), tasks=("ppl",), lengths=(400,),
                        samples=2, max_new_tokens=4)
    rows = run_bench(lm, embedded_tokenizer, sweep, model_name="tiny", progress=False,
                     console=Console(file=io.StringIO()))
    assert [(r["method"], r["sample"]) for r in rows] == [("none", 0), ("none", 1), ("snapkv:0.75", 0),
                                                         ("snapkv:0.75", 1)]
    for row in rows:
        assert row["metric"] == "perplexity" and row["eval_tokens"] == 100 and row["new_tokens"] == 0
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"])) and 0 <= row["score"] <= 1
    assert rows[2]["kv_bytes"] < rows[0]["kv_bytes"]
    markdown = load_report(tmp_path).markdown()
    assert "| perplexity | KV held |" in markdown
    for method in ("none", "snapkv:0.75"):
        nll = [r["nll"] for r in rows if r["method"] == method]
        assert f"| {math.exp(sum(nll) / len(nll)):.3f} |" in markdown  # equal eval_tokens: a plain mean of NLL
