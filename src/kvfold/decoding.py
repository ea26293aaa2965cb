"""Decoding: token choice (greedy, temperature + top-p), the decode loop over a kvfold cache, and
`generate_batch` for ragged batches of prompts.

`fast=True` runs the loop of `kvfold.fastpath`: in-place writes into pages reserved once, the Triton kernel over
device page tables, and on CUDA one captured graph per batch that replays the whole model step. `fast=False`
calls the model step by step through the normal cache path. Both store and read the same tokens, so greedy
decoding gives the same tokens (tested).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import fastpath
from .errors import KVFoldError
from .models import cache_keyword
from .sampling import GREEDY, Sampling, TextStream, choose_tokens


@dataclass
class Decoded:
    """What a decode loop produced: tokens per row (stop tokens excluded), why each row ended, and its cost."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop token or string) or "length"
    forwards: int  # model steps run (the last chosen token is never fed back)
    seconds: float
    cuda_graph: bool = False
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step: forward, choice, stop check


# on_token(row, token) -> True to end that row (e.g. a stop string was reached)
TokenCallback = Callable[[int, int], bool]


class _Runner:
    """Runs model steps of the fast loop: eager, or a captured CUDA graph replayed. `ids` [batch, 1] is the token
    fed at each step and `positions` [batch, 1] its RoPE position per row; both are updated in place."""

    def __init__(self, model, cache, ids: torch.Tensor, positions: torch.Tensor, max_steps: int,
                 cuda_graphs: bool) -> None:
        self.model, self.cache, self.ids, self.positions = model, cache, ids, positions
        self.layers = list(cache.layers)
        self.segments = fastpath.Segments(self.layers, ids.device, max_steps)
        self.fast = self.segments.fast
        # A graph needs every layer on this one GPU, read by the kernel. Eviction while decoding runs on the host
        # between segments; the queries it reads are kept in place (`KVFoldLayer._remember_queries`).
        self.graphs = (cuda_graphs and ids.device.type == "cuda" and all(f.use_kernel for f in self.fast)
                       and all(layer.device == ids.device for layer in self.layers))
        self.stream = torch.cuda.Stream(ids.device) if self.graphs else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.captured = False  # a graph was captured (and replayed) at some point

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, position_ids=self.positions, **{cache_keyword(self.model): self.cache},
                          use_cache=True).logits[:, -1]

    def step(self) -> torch.Tensor:
        """One model step on `ids` at `positions`; logits [batch, vocab] of the next token."""
        if not self.segments.begin():
            self.graph = None
        if self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits
        elif self.graphs:
            logits = self._warm_up_and_capture()
        else:
            logits = self._forward()
        self.positions += 1
        self.segments.advance()
        return logits

    def _warm_up_and_capture(self) -> torch.Tensor:
        """Run this step eagerly, then capture the next one (`fastpath.run_then_capture`; `ids` and `positions`
        are already the static inputs)."""
        logits, graph, graph_logits, error = fastpath.run_then_capture(self.ids.device, self.stream, self.layers,
                                                                       self._forward, self._forward)
        if error is not None:
            warnings.warn(f"kvfold: CUDA graph capture failed, decoding eagerly ({error})", stacklevel=2)
            self.graphs = False
        else:
            self.graph, self.graph_logits, self.captured = graph, graph_logits, True
        return logits

    def close(self) -> None:
        """End a segment cut short (every row stopped) and detach the fast state from the layers."""
        self.segments.close()


def decode(model, cache, first_logits: torch.Tensor, positions: torch.Tensor, max_new_tokens: int, *,
           sampling: Sampling = GREEDY, stop_ids: set[int] | frozenset[int] = frozenset(),
           on_token: TokenCallback | None = None, fast: bool = False, cuda_graphs: bool = True) -> Decoded:
    """Choose up to `max_new_tokens` tokens per row after `first_logits` [batch, n, vocab], feeding each back
    through `cache` except the last. `positions` [batch]: the RoPE position of each row's next token (its real
    tokens so far). A row ends at a token of `stop_ids` (not included) or when `on_token` returns True; rows that
    ended still ride along in the batch (their tokens are dropped) until every row has ended."""
    batch, device = first_logits.shape[0], first_logits.device
    generator = None
    if not sampling.greedy and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    ended = [False] * batch
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = positions.to(device=device, dtype=torch.long).view(batch, 1).clone()
    runner = _Runner(model, cache, ids, pos, max(0, max_new_tokens - 1), cuda_graphs) if fast else None
    logits, forwards, steps = first_logits[:, -1], 0, []
    start = last = time.perf_counter()
    try:
        for step in range(max_new_tokens):
            chosen = choose_tokens(logits, sampling, generator)
            for row, token in enumerate(chosen.tolist()):
                if ended[row]:
                    continue
                if token in stop_ids:
                    ended[row], reasons[row] = True, "stop"
                    continue
                tokens[row].append(token)
                if on_token is not None and on_token(row, token):
                    ended[row], reasons[row] = True, "stop"
            if step:
                now = time.perf_counter()
                steps.append(now - last)
                last = now
            if all(ended) or step == max_new_tokens - 1:
                break
            ids.copy_(chosen.view(batch, 1))
            if runner is not None:
                logits = runner.step()
            else:
                logits = model(input_ids=ids, position_ids=pos, **{cache_keyword(model): cache},
                               use_cache=True).logits[:, -1]
                pos += 1
            forwards += 1
    finally:
        if runner is not None:
            runner.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Decoded(tokens, reasons, forwards, time.perf_counter() - start, bool(runner and runner.captured), steps)


@dataclass
class Generation:
    """One row of `generate_batch`: its tokens, text (with a tokenizer) and why it ended."""

    tokens: list[int]
    text: str | None
    finish_reason: str


@dataclass
class BatchResult:
    outputs: list[Generation]
    prefill_seconds: float
    decode_seconds: float
    forwards: int
    kv_bytes: int  # what the cache held at the end
    cuda_graph: bool


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], *, method="none", max_new_tokens: int = 32,
                   sampling: Sampling = GREEDY, tokenizer=None, stop: Sequence[str] = (),
                   on_text: Callable[[int, str], None] | None = None, fast: bool = True, cuda_graphs: bool = True,
                   prefill_chunk: int | None = None) -> BatchResult:
    """Generate for a ragged batch of token-id prompts with a compressed cache.

    Prompts are left-padded and prefilled together (padding is never stored); each row then decodes at its own
    position. Rows end at the model's EOS ids, at a `stop` string (needs `tokenizer`; the text is cut before it)
    or after `max_new_tokens`. `on_text(row, delta)` streams text as it becomes final (needs `tokenizer`).
    """
    from .api import check_chunk, make_cache, prefill, stop_token_ids, use_kvfold_attention
    from .models import context_limit

    check_chunk(prefill_chunk)
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise KVFoldError("every prompt needs at least one token")
    if (stop or on_text) and tokenizer is None:
        raise KVFoldError("stop strings and streamed text need the tokenizer (tokenizer=...)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KVFoldError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit, longest = context_limit(model.config), max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise KVFoldError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                          f"of {limit}: shorten the prompt or lower max_new_tokens")
    device = next(model.parameters()).device
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        mask[row, longest - len(prompt):] = 1
    stop_ids = stop_token_ids(model, tokenizer)
    streams = [TextStream(tokenizer, tuple(stop)) for _ in prompts] if tokenizer is not None else None

    hit_stop: set[int] = set()

    def on_token(row: int, token: int) -> bool:
        delta, hit = streams[row].add(token)
        if on_text is not None and delta:
            on_text(row, delta)
        if hit:
            hit_stop.add(row)
        return hit

    with use_kvfold_attention(model):
        cache = make_cache(model, method)
        start = time.perf_counter()
        logits = prefill(model, cache, ids, chunk=prefill_chunk, attention_mask=mask)
        prefill_seconds = time.perf_counter() - start
        out = decode(model, cache, logits, mask.sum(dim=1), max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                     on_token=on_token if streams is not None else None, fast=fast, cuda_graphs=cuda_graphs)
    outputs = []
    for row, tokens in enumerate(out.tokens):
        text = None
        if streams is not None:
            rest = "" if row in hit_stop else streams[row].flush()
            if on_text is not None and rest:
                on_text(row, rest)
            text = streams[row].text
        outputs.append(Generation(tokens, text, out.finish_reasons[row]))
    return BatchResult(outputs, prefill_seconds, out.seconds, out.forwards, cache.nbytes(), out.cuda_graph)

