"""Teacher-forced perplexity through a compressed cache: the context is compressed as it is read (query-agnostic:
no question is known), then the continuation is fed through that cache and every next token is scored.

This measures what a method removes from a model's view of the text, with no answer extraction in between: with
`none` it equals the model's own loss over the whole text (tested); every other method can only change the
continuation's loss through what its cache dropped or rounded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .api import make_cache, prefill, use_kvfold_attention
from .compressor import Compressor
from .errors import KVFoldError
from .models import cache_keyword, context_limit


@dataclass(frozen=True)
class TeacherForced:
    """The continuation's mean negative log-likelihood (nats per token), top-1 next-token accuracy, and costs."""

    nll: float
    accuracy: float
    eval_tokens: int
    context_tokens: int
    kv_bytes: int  # what the cache held after the continuation was fed
    prefill_seconds: float
    eval_seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@torch.inference_mode()
def teacher_forced(model, tokenizer, text: str, *, method: str | Compressor = "none", eval_tokens: int = 256,
                   prefill_chunk: int | None = None) -> TeacherForced:
    """Compress all but the last `eval_tokens` tokens of `text` with `method` (in chunks of `prefill_chunk` if
    given), then score the last `eval_tokens` tokens, each predicted from the compressed context and the true
    tokens before it (one forward through the cache)."""
    compressor = method if isinstance(method, Compressor) else Compressor.parse(method)
    ids = tokenizer(text)["input_ids"]
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or not 1 <= eval_tokens < len(ids):
        raise KVFoldError(f"eval_tokens must be an integer in [1, {len(ids) - 1}] (the text has {len(ids)} tokens; "
                          f"the rest is the context), got {eval_tokens!r}")
    limit = context_limit(model.config)
    if len(ids) > limit:
        raise KVFoldError(f"the text has {len(ids)} tokens, past the model's context of {limit}: shorten it")
    device = next(model.parameters()).device
    head, tail = ids[:-eval_tokens], torch.tensor([ids[-eval_tokens:]], device=device)
    with use_kvfold_attention(model):
        cache = make_cache(model, compressor)
        start = time.perf_counter()
        first = prefill(model, cache, torch.tensor([head], device=device), chunk=prefill_chunk)[:, -1:]
        prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        logits = first
        if eval_tokens > 1:
            n = len(head) + eval_tokens - 1
            rest = model(input_ids=tail[:, :-1], attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                         position_ids=torch.arange(len(head), n, device=device).view(1, -1), **{cache_keyword(model): cache},
                         use_cache=True).logits
            logits = torch.cat([first, rest], dim=1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, tail.unsqueeze(-1)).mean()
        accuracy = (logits.argmax(dim=-1) == tail).float().mean()
        eval_seconds = time.perf_counter() - start
    return TeacherForced(float(nll), float(accuracy), eval_tokens, len(head), cache.nbytes(), prefill_seconds,
                         eval_seconds)
