"""The Python API: `compress(model, spec)` for `model.generate`, and `generate(...)` for context + question(s)
in the two settings, query-aware (the question is compressed with the context) and query-agnostic (the context
is compressed first, then each question is asked on a fork of it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import attention
from .cache import KVFoldCache
from .compressor import Compressor
from .decoding import decode
from .errors import KVFoldError
from .models import cache_keyword, check_supported, context_limit


def make_cache(model, method: str | Compressor = "none", compress_appends: bool = False) -> KVFoldCache:
    """A fresh `KVFoldCache` for `model` (its attention must be "kvfold": see `compress`)."""
    compressor = method if isinstance(method, Compressor) else Compressor.parse(method)
    return KVFoldCache(model.config, compressor, compress_appends=compress_appends)


@dataclass
class CompressionSession:
    """What `compress()` yields: the compressor and the caches it made for `generate` calls (`.cache`: the latest)."""

    compressor: Compressor
    caches: list[KVFoldCache] = field(default_factory=list)

    @property
    def cache(self) -> KVFoldCache | None:
        return self.caches[-1] if self.caches else None


@contextlib.contextmanager
def use_kvfold_attention(model) -> Iterator[None]:
    """Switch the model's attention to kvfold's registered function, restoring the previous one on exit."""
    check_supported(model.config)
    attention.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def compress(model, method: str | Compressor, prefill_chunk: int | None = None) -> Iterator[CompressionSession]:
    """`with kvfold.compress(model, "snapkv:0.75"): model.generate(...)` — every generate call inside gets a fresh
    compressed cache (unless it passes its own `cache` / `past_key_values`). Yields a session whose `.cache` is the last one
    it made. Contexts nest: the innermost method applies. `prefill_chunk=N` prefills the prompt N tokens at a
    time, compressing after each chunk, before `generate` takes over (see `prefill`).
    """
    check_chunk(prefill_chunk)
    compressor = method if isinstance(method, Compressor) else Compressor.parse(method)
    session = CompressionSession(compressor)
    original = model.generate

    def generate_with_cache(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            cache = kwargs[cache_keyword(model)] = make_cache(model, compressor)
            session.caches.append(cache)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if prefill_chunk and input_ids is not None and input_ids.shape[1] > prefill_chunk + 1:
                mask = kwargs.get("attention_mask")
                with torch.no_grad():  # not inference_mode: generate() updates the cache's tensors in place later
                    prefill(model, cache, input_ids[:, :-1], chunk=prefill_chunk,
                            attention_mask=None if mask is None else mask[:, :-1])
        return original(*args, **kwargs)

    own = model.__dict__.get("generate")  # an outer compress() may have wrapped it already
    with use_kvfold_attention(model):
        model.generate = generate_with_cache
        try:
            yield session
        finally:
            if own is None:
                del model.generate
            else:
                model.generate = own


def split_prompt(tokenizer, context: str, question: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat prompt, split where the question starts: (context part, question part).

    The context part holds the chat template's opening and the context; the question part the question and the
    template's assistant opening. Query-agnostic compression compresses the first part alone.
    """
    if not context.strip():
        raise KVFoldError("the context is empty: give some text to compress (e.g. --context-file F)")
    marker = "\x00KVFOLD_QUESTION\x00"
    user = f"{context}\n\n{marker}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = user + "\n"
    head, _, tail = text.partition(marker)
    head_ids = tokenizer(head, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
    tail_ids = tokenizer(question + tail, add_special_tokens=False)["input_ids"]
    return head_ids, tail_ids


@dataclass
class Answer:
    """One generated answer with what it cost."""

    text: str
    tokens: list[int]
    kv_bytes: int  # bytes the cache held when generation ended
    prefill_seconds: float
    decode_seconds: float


def stop_token_ids(model, tokenizer=None) -> set[int]:
    """Token ids that end an answer: the model's generation-config EOS ids and the tokenizer's EOS (if given)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    return ids | ({tokenizer_eos} if tokenizer_eos is not None else set())


def decode_greedy(model, cache: KVFoldCache, first_logits: torch.Tensor, seen: int, max_new_tokens: int,
                  stop_ids: set[int], fast: bool = False) -> list[int]:
    """Greedy tokens (batch 1) after `first_logits`, the next one at RoPE position `seen`; see `decoding.decode`."""
    return decode(model, cache, first_logits, torch.tensor([seen]), max_new_tokens, stop_ids=stop_ids,
                  fast=fast).tokens[0]


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, limit: int) -> None:
    if prompt_tokens + max_new_tokens > limit:
        raise KVFoldError(f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens exceeds the model's "
                          f"context of {limit}: shorten the context or lower max_new_tokens")


def decode_answer(model, tokenizer, cache: KVFoldCache, first_logits: torch.Tensor, seen: int, max_new_tokens: int,
                  stop_ids: set[int], fast: bool, prefill_seconds: float) -> Answer:
    """Greedy-decode an answer after a prefill (inside `use_kvfold_attention`) and time it."""
    start = time.perf_counter()
    tokens = decode_greedy(model, cache, first_logits, seen, max_new_tokens, stop_ids, fast)
    return Answer(tokenizer.decode(tokens, skip_special_tokens=True), tokens, cache.nbytes(), prefill_seconds,
                  time.perf_counter() - start)


def forward_tokens(model, cache: KVFoldCache, ids: Sequence[int], start: int) -> torch.Tensor:
    """One forward of token ids (batch 1) at positions start.., through `cache`; the last position's logits."""
    input_ids = torch.tensor([list(ids)], device=next(model.parameters()).device)
    return prefill(model, cache, input_ids, start=start)


def check_chunk(prefill_chunk: int | None) -> None:
    if prefill_chunk is None:
        return
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk <= 0:
        raise KVFoldError(f"prefill_chunk must be a positive number of tokens (None = prefill in one pass), "
                          f"got {prefill_chunk!r}")


def prefill(model, cache: KVFoldCache, input_ids: torch.Tensor, *, chunk: int | None = None,
            attention_mask: torch.Tensor | None = None, probe_ids: Sequence[int] | None = None,
            start: int = 0) -> torch.Tensor:
    """Feed `input_ids` [batch, n] into `cache`, `chunk` tokens at a time, and return the last position's logits.

    After each chunk the cache is evicted back to its budget (the ratio of all tokens read so far, or the token
    budget), so its memory never exceeds budget + one chunk; with a quantizer what it keeps is packed when the
    prompt ends (or after each chunk, with `defer=false`: see `methods.base.Quantizer`). Each chunk attends to
    the compressed past plus itself at its true positions. `probe_ids` (the question, when known) are appended to every chunk but the last
    as the scorer's observation window, then dropped. `chunk=None` is one forward. `attention_mask` [batch, start + n]
    marks left padding as in `model.generate`.
    """
    check_chunk(chunk)
    batch, total = input_ids.shape
    device = input_ids.device
    if chunk is None or chunk >= total:
        bounds = [(0, total)]
    else:
        bounds = [(i, min(i + chunk, total)) for i in range(0, total, chunk)]
    probe = torch.tensor([list(probe_ids or [])], dtype=input_ids.dtype, device=device).expand(batch, -1)
    if attention_mask is None:
        attention_mask = torch.ones(batch, start + total, dtype=torch.long, device=device)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if len(bounds) > 1:
        cache.begin_chunks()
    try:
        for i, (lo, hi) in enumerate(bounds):
            ids, mask, pos = input_ids[:, lo:hi], attention_mask[:, :start + hi], positions[:, start + lo:start + hi]
            n_probe = probe.shape[1] if i < len(bounds) - 1 else 0
            if n_probe:
                ids = torch.cat([ids, probe], dim=1)
                mask = torch.cat([mask, torch.ones_like(probe)], dim=1)
                pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(n_probe, device=device)], dim=1)
            cache.set_probe(n_probe)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_keyword(model): cache},
                           use_cache=True, logits_to_keep=1).logits
    finally:
        if len(bounds) > 1:
            cache.finish_chunks()
    return logits


@torch.inference_mode()
def generate(model, tokenizer, *, context: str, question: str | Sequence[str], method: str | Compressor = "none",
             agnostic: bool = False, max_new_tokens: int = 32, prefill_chunk: int | None = None,
             fast: bool = False) -> list[Answer]:
    """Answer one or several questions about `context` with a compressed cache (greedy decoding).

    query-aware (default): each question is appended to the context and the whole prompt is compressed, as in the
    SnapKV paper. query-agnostic (`agnostic=True`): the context alone is compressed once, then every question is
    asked on a copy-on-write fork of that cache, as in SCBench. `prefill_chunk=N` reads the context N tokens at a
    time and compresses after each chunk (bounded memory); query-aware, the question is repeated after every chunk
    as the scorer's window. `fast=True` decodes with the fast loop (`kvfold.decoding`; CUDA graphs on a GPU),
    which gives the same greedy tokens.
    """
    check_chunk(prefill_chunk)
    questions = [question] if isinstance(question, str) else list(question)
    if not questions:
        raise KVFoldError("no question given")
    compressor = method if isinstance(method, Compressor) else Compressor.parse(method)
    limit = context_limit(model.config)
    stop_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    answers = []
    with use_kvfold_attention(model):
        shared = None
        for q in questions:
            head, tail = split_prompt(tokenizer, context, q)
            check_prompt_fits(len(head) + len(tail), max_new_tokens, limit)
            start = time.perf_counter()
            if agnostic:
                if shared is None:
                    shared = make_cache(model, compressor)
                    prefill(model, shared, torch.tensor([head], device=device), chunk=prefill_chunk)
                cache = shared.fork()
                logits = forward_tokens(model, cache, tail, len(head))
            else:
                cache = make_cache(model, compressor)
                logits = prefill(model, cache, torch.tensor([head + tail], device=device), chunk=prefill_chunk,
                                 probe_ids=tail if compressor.query_aware else None)
            answers.append(decode_answer(model, tokenizer, cache, logits, len(head) + len(tail), max_new_tokens,
                                         stop_ids, fast, time.perf_counter() - start))
    return answers
