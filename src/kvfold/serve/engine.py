"""The serving engine: one worker thread runs requests one at a time, first in first out, from a bounded queue.

Scheduling in v1 is deliberately simple: torch is not re-entrant on one model, so a single worker owns the model
and runs each request to the end (prefill from the deepest prefix-cache snapshot, then decoding) before taking
the next. There is NO continuous batching across requests yet: throughput is one sequence's decode speed, and a
queued request waits for every request ahead of it. Tokens flow back to the asyncio side through the job's
`asyncio.Queue`, fed with `loop.call_soon_threadsafe`. A client that goes away sets `Job.cancelled`; the worker
checks it between prefill blocks and decode steps, stops, and releases the request's cache.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..api import prefill, stop_token_ids, use_kvfold_attention
from ..cache import KVFoldCache
from ..compressor import Compressor
from ..errors import KVFoldError
from ..models import cache_keyword, check_supported, context_limit
from .config import ServeConfig
from .jobs import Event, GenerationRequest, Job, JobQueue, ServeError, Usage
from .metrics import Metrics
from .prefix_cache import PrefixCache, kv_upper_bound, release
from ..sampling import Sampling, TextStream, choose_tokens

logger = logging.getLogger("kvfold.serve")
GUARD_EVERY = 64  # decode steps between checks that the KV held is still under the budget


class Engine:
    """Owns the model while it runs: a worker thread, the bounded queue and the prefix cache."""

    def __init__(self, model, tokenizer, config: ServeConfig, metrics: Metrics | None = None) -> None:
        check_supported(model.config)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.metrics = metrics or Metrics()
        self.prefix = PrefixCache(config.kv_budget, config.block)
        self.limit = context_limit(model.config)
        self.stop_ids = stop_token_ids(model, tokenizer)
        parameter = next(model.parameters())
        self.device, self.element_size = parameter.device, parameter.element_size()
        self._queue = JobQueue(config.queue)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.running: Job | None = None
        self.live_bytes = 0  # bytes referenced by the running request's cache; 0 between requests

    # ---- lifecycle and admission ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._work, name="kvfold-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running request, fail the queued ones (503) and end the worker."""
        self._stopping.set()
        if self.running is not None:
            self.running.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in self._queue.drain():
            job.fail(503, "the server is shutting down")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull."""
        self._queue.put(job)

    def pause(self) -> None:
        """Hold the worker before its next request (maintenance; tests fill the queue this way)."""
        self._queue.set_paused(True)

    def resume(self) -> None:
        self._queue.set_paused(False)

    def idle(self) -> bool:
        """No request waiting or running (every submitted job has finished)."""
        return self._queue.unfinished == 0

    def kv_needed(self, tokens: int, compressor: Compressor) -> int:
        """Upper bound of the KV bytes a request of `tokens` tokens (prompt + max_tokens) can hold."""
        return kv_upper_bound(self.model.config, compressor, tokens, self.element_size)

    # ---- the worker ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        with use_kvfold_attention(self.model), torch.inference_mode():
            while not self._stopping.is_set():
                job = self._queue.take(timeout=0.2)
                if job is None:
                    continue
                self.running = job
                try:
                    self._run(job)
                except ServeError as err:
                    job.fail(err.status, err.message)
                except KVFoldError as err:
                    job.fail(400, str(err))
                except Exception:
                    logger.exception("request %s failed", job.request.request_id)
                    job.fail(500, "internal error while generating: see the server log")
                finally:
                    self.running = None
                    self._queue.finished()

    def _run(self, job: Job) -> None:
        req, block, started = job.request, self.config.block, time.perf_counter()
        if job.cancelled.is_set():
            self.metrics.add("cancelled")
            return
        ids = list(req.prompt_ids)
        namespace = (self.config.model_id, req.compressor.spec)
        blocks = self.prefix.cacheable_blocks(len(ids))
        reused, snapshot = self.prefix.match(namespace, ids[:blocks * block])
        cache = snapshot.fork() if snapshot is not None else KVFoldCache(self.model.config, req.compressor,
                                                                         compress_appends=True)
        usage = Usage(len(ids), reused, req.compressor.spec)
        try:
            if not self._room(ids, reused, req, cache):
                raise ServeError(503, f"the KV cache budget ({self.config.kv_budget} bytes) cannot hold this "
                                      "request now: retry later, lower max_tokens, or raise --kv-budget")
            pos = reused
            while pos < blocks * block:
                if job.cancelled.is_set():
                    return self._cancelled(req, usage)
                prefill(self.model, cache, self._tensor(ids[pos:pos + block]), start=pos)
                pos += block
                self.prefix.insert(namespace, ids[:pos], cache.fork())
                if not self._room(ids, pos, req, cache):
                    raise ServeError(503, "the KV cache budget filled up during the prefill: retry later or raise "
                                          "--kv-budget")
            logits = prefill(self.model, cache, self._tensor(ids[pos:]), start=pos)
            self.metrics.add("prompt_tokens", len(ids))
            self.metrics.add("prefilled_tokens", len(ids) - reused)
            self.metrics.add("reused_tokens", reused)
            self.live_bytes = usage.kv_bytes = cache.referenced_nbytes()
            job.post(Event("started", usage=usage))
            finish = self._decode(job, cache, logits, usage)
            if finish is None:
                return self._cancelled(req, usage)
            usage.kv_bytes = cache.referenced_nbytes()
            job.post(Event("done", finish_reason=finish, usage=usage))
            logger.info("request %s: %d prompt tokens (%d reused), %d generated, finish=%s, %s, %.2f s",
                        req.request_id, usage.prompt_tokens, reused, usage.completion_tokens, finish,
                        req.compressor.spec, time.perf_counter() - started)
        finally:
            release(cache)
            self.live_bytes = 0
            self.prefix.make_room(0)  # re-measure (and trim) now that the request's pages are free

    def _room(self, ids: list[int], done: int, req: GenerationRequest, cache: KVFoldCache) -> bool:
        """Evict snapshots until what the request may still add fits under the budget."""
        return self.prefix.make_room(self.kv_needed(len(ids) - done + req.max_tokens, req.compressor), live=[cache])

    def _cancelled(self, req: GenerationRequest, usage: Usage) -> None:
        self.metrics.add("cancelled")
        logger.info("request %s cancelled by the client after %d tokens", req.request_id, usage.completion_tokens)

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.device)

    def _decode(self, job: Job, cache: KVFoldCache, logits: torch.Tensor, usage: Usage) -> str | None:
        """Generate, posting text deltas; returns the finish reason ('stop', 'length') or None if cancelled."""
        req = job.request
        generator = None
        if req.temperature > 0:
            generator = torch.Generator()
            if req.seed is not None:
                generator.manual_seed(req.seed)
            else:
                generator.seed()
        text, seen = TextStream(self.tokenizer, req.stop), len(req.prompt_ids)
        for step in range(req.max_tokens):
            if job.cancelled.is_set():
                return None
            token = int(choose_tokens(logits[:, -1].float().cpu(), Sampling(req.temperature, req.top_p), generator)[0])
            if token in self.stop_ids:
                self._post_text(job, text.flush())
                return "stop"
            usage.completion_tokens += 1
            self.metrics.add("generated_tokens")
            delta, stopped = text.add(token)
            self._post_text(job, delta)
            if stopped:
                return "stop"
            if step == req.max_tokens - 1:
                break
            logits = self.model(input_ids=self._tensor([token]), **{cache_keyword(self.model): cache}, use_cache=True,
                                position_ids=torch.tensor([[seen]], device=self.device)).logits
            seen += 1
            if step % GUARD_EVERY == GUARD_EVERY - 1:
                self.live_bytes = cache.referenced_nbytes()
                if not self.prefix.make_room(0, live=[cache]):
                    raise ServeError(503, "the request outgrew the KV budget while decoding: lower max_tokens "
                                          "or raise --kv-budget")
        self._post_text(job, text.flush())
        return "length"

    @staticmethod
    def _post_text(job: Job, delta: str) -> None:
        if delta:
            job.post(Event("delta", text=delta))
