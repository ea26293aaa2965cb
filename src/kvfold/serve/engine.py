"""The serving engine: one worker thread owns the model and decodes the running requests as one batch.

Continuous batching: each iteration the worker prefills one block (`--block` tokens) of the request being
admitted (alone, from the deepest prefix-cache snapshot), then runs one decode step for every running request
together — one forward of batch B through a `joint.JointCache`, where row i attends over request i's own
compressed cache (its own method, clocks and positions). When its prompt is in, the request joins the batch; when
it stops, it leaves, and the next queued one starts prefilling. The weights are read once per step for all of
them, which is what makes serving B requests cheaper than B times one; and a long prompt delays the running
streams by one block per step, not by its whole prefill. Every request's cache draws on the engine's one
`pages.PoolSet`, so the requests of one method read a layer in one kernel launch (`fastpath.joint_step`), and on a
GPU the step of requests that keep decoding together is replayed from a CUDA graph (`joint.JointGraphs`).

Admission is by KV bytes: a request joins only if the prefix cache can make room for the bytes it may still add
(prompt left to prefill + max_tokens, an upper bound) on top of what the running requests may still add. One that
cannot fit now waits at the head of the queue until a running request finishes; one that cannot fit even alone gets
503. Tokens flow back to the asyncio side through each job's `asyncio.Queue`, fed with `loop.call_soon_threadsafe`.
A client that goes away sets `Job.cancelled`; the worker checks it between prefill blocks and decode steps, drops
the request from the batch and releases its cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator

import torch

from ..api import prefill, stop_token_ids, use_kvfold_attention
from ..cache import KVFoldCache
from ..compressor import Compressor
from ..fastpath import Segments
from ..joint import JointGraphs, joint_forward
from ..models import check_supported, context_limit
from ..pages import PoolSet
from .config import ServeConfig
from .jobs import Event, GenerationRequest, Job, JobQueue, Running, ServeError, Usage, error_status
from .metrics import Metrics
from .prefix_cache import PrefixCache, held_nbytes, kv_upper_bound, release
from ..sampling import Sampling, TextStream, choose_tokens

logger = logging.getLogger("kvfold.serve")
GUARD_EVERY = 64  # decode steps between checks that the KV held is still under the budget


class Engine:
    """Owns the model while it runs: a worker thread, the bounded queue, the decode batch and the prefix cache."""

    def __init__(self, model, tokenizer, config: ServeConfig, metrics: Metrics | None = None) -> None:
        check_supported(model.config)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.metrics = metrics or Metrics()
        self.prefix = PrefixCache(config.kv_budget, config.block)
        self.pools = PoolSet()  # every request's pages: one kernel launch per layer reads the whole batch's rows
        self.limit = context_limit(model.config)
        self.stop_ids = stop_token_ids(model, tokenizer)
        parameter = next(model.parameters())
        self.device, self.element_size = parameter.device, parameter.element_size()
        # the joint step replayed from a CUDA graph while the same requests decode together (GPU, fast path)
        self.graphs = (JointGraphs(model, self.device) if config.fast and config.cuda_graphs
                       and self.device.type == "cuda" else None)
        self._queue = JobQueue(config.queue)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.batch: list[Running] = []  # the worker's; other threads only read its length
        self.live_bytes = 0  # bytes referenced by the running requests' caches; 0 when none runs
        self.steps = 0  # joint decode steps run
        self.peak_batch = 0  # the most requests one step has decoded together
        self._waiting = False  # the queue's head waits for a running request to end (see `_admit_one_block`)
        self._admitting: tuple[Job, Generator] | None = None  # the request being prefilled, block by block
        self._admitting_cache: KVFoldCache | None = None  # ... and its cache

    # ---- lifecycle and admission ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._work, name="kvfold-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the worker; running and queued requests fail with 503."""
        self._stopping.set()
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

    @property
    def running_requests(self) -> int:
        return len(self.batch)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull."""
        self._queue.put(job)

    def pause(self) -> None:
        """Hold the worker before it admits another request (maintenance; tests fill the queue this way)."""
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
                try:
                    self._iterate()
                except Exception:  # noqa: BLE001  a bug must not kill the worker and leave clients hanging
                    logger.exception("the engine's iteration failed; failing the requests in flight")
                    self._fail_all(500, "internal error while generating: see the server log")
            self._fail_all(503, "the server is shutting down")

    def _iterate(self) -> None:
        """Admit (one prefill block), then one decode step for the batch."""
        if self._admitting is None and len(self.batch) < self.config.max_batch and not (self._waiting and self.batch):
            self._waiting = False
            job = self._queue.take(timeout=0.0 if self.batch else 0.2)
            if job is not None:
                self._admitting = (job, self._prefill(job))
        if self._admitting is not None:
            self._admit_one_block()
        if self.batch:
            self._step()

    def _fail_all(self, status: int, message: str) -> None:
        """End the request being prefilled and every running one with an error; their pages are released."""
        if self._admitting is not None:
            job, blocks = self._admitting
            self._admitting = None
            blocks.close()  # releases its cache
            self._queue.finished()
            job.fail(status, message)
        batch, self.batch = self.batch, []
        for running in batch:
            try:
                self._end(running, error=(status, message))
            except Exception:  # noqa: BLE001
                logger.exception("request %s: ending it failed", running.request.request_id)
        self.live_bytes = 0

    def _admit_one_block(self) -> None:
        """Prefill one more block of the request being admitted; when its prompt is in, it joins the batch. Or it
        goes back to wait for room, or fails."""
        job, blocks = self._admitting
        try:
            next(blocks)
            return
        except StopIteration as done:
            running = done.value
        except _Wait:
            self._admitting = None
            if not self._queue.put_front(job):  # the queue was closed for shutdown meanwhile
                self._queue.finished()
                job.fail(503, "the server is shutting down")
            self._waiting = True
            return
        except Exception as err:  # noqa: BLE001  every failure becomes the request's HTTP error, never the worker's
            self._admitting = None
            self.live_bytes = self._live_bytes()
            self.prefix.make_room(0, live=self._caches())
            self._queue.finished()
            job.fail(*error_status(err, job))
            return
        self._admitting = None
        if running is None:  # cancelled during its prefill
            self.live_bytes = self._live_bytes()
            self._queue.finished()
            return
        self.batch.append(running)
        self.live_bytes = self._live_bytes()

    def _prefill(self, job: Job) -> Generator[None, None, Running | None]:
        """Prefill the job's prompt, yielding after each block; returns its `Running`, or None if cancelled."""
        req, block, started = job.request, self.config.block, time.perf_counter()
        if job.cancelled.is_set():
            self.metrics.add("cancelled")
            return None
        ids = list(req.prompt_ids)
        if not self._fits_beside_running(ids, req):  # decided before the prefix cache is touched (no eviction, and
            raise _Wait  # no hit or miss counted for each retry)
        generator = None
        if req.temperature > 0:
            generator = torch.Generator()
            if req.seed is not None:
                generator.manual_seed(req.seed)
            else:
                generator.seed()
        namespace = (self.config.model_id, req.compressor.spec)
        blocks = self.prefix.cacheable_blocks(len(ids))
        reused, snapshot = self.prefix.match(namespace, ids[:blocks * block])
        cache = snapshot.fork() if snapshot is not None else KVFoldCache(self.model.config, req.compressor,
                                                                         compress_appends=True, pools=self.pools)
        usage = Usage(len(ids), reused, req.compressor.spec)
        self._admitting_cache = cache
        try:
            if not self._room(ids, reused, req):
                raise ServeError(503, f"the KV cache budget ({self.config.kv_budget} bytes) cannot hold this "
                                      "request now: retry later, lower max_tokens, or raise --kv-budget")
            pos = reused
            while pos < blocks * block:
                if job.cancelled.is_set():
                    self._cancelled(req, usage)
                    release(cache)
                    return None
                prefill(self.model, cache, self._tensor(ids[pos:pos + block]), start=pos)
                pos += block
                self.prefix.insert(namespace, ids[:pos], cache.fork())
                if not self._room(ids, pos, req):
                    raise ServeError(503, "the KV cache budget filled up during the prefill: retry later or raise "
                                          "--kv-budget")
                yield
            logits = prefill(self.model, cache, self._tensor(ids[pos:]), start=pos)
            usage.kv_bytes = cache.referenced_nbytes()
            running = Running(job, cache, usage, TextStream(self.tokenizer, req.stop), generator,
                              logits[0, -1].float().cpu(), started)
        except BaseException:
            release(cache)
            raise
        finally:
            self._admitting_cache = None
        self.metrics.add("prompt_tokens", len(ids))
        self.metrics.add("prefilled_tokens", len(ids) - reused)
        self.metrics.add("reused_tokens", reused)
        job.post(Event("started", usage=usage))
        return running

    def _step(self) -> None:
        """Choose each running request's next token; end those that stop; one joint forward for the rest."""
        going = []
        for running in self.batch:
            try:
                finish = self._choose(running)
            except Exception as err:  # noqa: BLE001  (e.g. a tokenizer error on one request)
                self._end(running, error=error_status(err, running.job))
                continue
            if finish is None:
                going.append(running)
            else:
                self._end(running, finish=finish)
        self.batch = going
        if not going:
            self.live_bytes = 0
            return
        self.peak_batch = max(self.peak_batch, len(going))
        try:
            caches = [running.cache for running in going]
            ids = torch.tensor([[running.token] for running in going], device=self.device)
            if self.config.fast:
                moved = False
                for running in going:
                    if running.segments is None:
                        left = running.request.max_tokens - running.usage.completion_tokens  # forwards, at most
                        running.segments = Segments(list(running.cache.layers), self.device, left)
                    moved |= not running.segments.begin()
                for running in going:  # the caches share pools: another's begin (or a prefill, or an eviction
                    moved |= running.segments.refresh()  # since the last step) may have moved them
                positions = torch.tensor([[running.segments.seen] for running in going], device=self.device)
            else:
                moved, positions = False, torch.tensor([[cache.get_seq_length()] for cache in caches],
                                                       device=self.device)
            logits = (self.graphs.step(caches, ids, positions, moved) if self.graphs is not None
                      else joint_forward(self.model, caches, ids, positions)).float().cpu()
        except Exception:  # noqa: BLE001  a failed step fails every request in it (it cannot be retried: earlier
            # layers already stored the token); which request's method raised is unknown, so all get a 500
            logger.exception("a joint decode step of %d requests failed", len(going))
            self._fail_all(500, "internal error while decoding a batch: see the server log")
            return
        for running, row in zip(going, logits):
            running.logits = row
            if running.segments is not None:
                running.segments.advance()
        self.steps += 1
        if self.steps % GUARD_EVERY == 0:
            self._guard()

    def _choose(self, running: Running) -> str | None:
        """Pick the next token from the request's logits and post its text; the finish reason if it ends now
        ('stop', 'length', or 'cancelled'), else None (the token goes into the next forward)."""
        req = running.request
        if running.job.cancelled.is_set():
            return "cancelled"
        token = int(choose_tokens(running.logits[None], Sampling(req.temperature, req.top_p), running.generator)[0])
        if token in self.stop_ids:
            return "stop"
        running.usage.completion_tokens += 1
        self.metrics.add("generated_tokens")
        delta, stopped = running.text.add(token)
        self._post_text(running.job, delta)
        if stopped:
            return "stop"
        if running.usage.completion_tokens == req.max_tokens:
            return "length"
        running.token = token
        return None

    def _guard(self) -> None:
        """Every GUARD_EVERY steps: while the budget cannot hold the running caches, the newest request fails."""
        while self.batch and not self.prefix.make_room(0, live=self._caches()):
            self._end(self.batch.pop(), error=(503, "the requests running outgrew the KV budget while decoding: "
                                                    "lower max_tokens or raise --kv-budget"))
        self.live_bytes = self._live_bytes()

    def _end(self, running: Running, finish: str | None = None, error: tuple[int, str] | None = None) -> None:
        """A request leaves the batch: its last text and 'done', or its error; its cache's pages are released."""
        req, usage = running.request, running.usage
        try:
            if running.segments is not None:  # the host catches up: lengths, unused reserve, clocked packing
                running.segments, segments = None, running.segments
                segments.close()
            if finish == "cancelled":
                self._cancelled(req, usage)
            elif error is not None:
                running.job.fail(*error)
            else:
                self._post_text(running.job, running.text.flush())
                usage.kv_bytes = running.cache.referenced_nbytes()
                running.job.post(Event("done", finish_reason=finish, usage=usage))
                logger.info("request %s: %d prompt tokens (%d reused), %d generated, finish=%s, %s, %.2f s",
                            req.request_id, usage.prompt_tokens, usage.reused_tokens, usage.completion_tokens,
                            finish, req.compressor.spec, time.perf_counter() - running.started)
        finally:
            release(running.cache)
            self._waiting = False  # room may have opened for the request waiting at the head of the queue
            rest = [other for other in self.batch if other is not running]
            self.prefix.make_room(0, live=[other.cache for other in rest])  # re-measure now that pages are free
            self.live_bytes = sum(other.cache.referenced_nbytes() for other in rest)
            self._queue.finished()  # last: whoever sees the engine idle sees its bytes already counted

    def _reserve(self, ids: list[int], done: int, req: GenerationRequest) -> int:
        """Bytes this request (`done` prompt tokens in) and the running ones may still add, at most."""
        return self.kv_needed(len(ids) - done + req.max_tokens, req.compressor) + sum(
            self.kv_needed(r.request.max_tokens - r.usage.completion_tokens, r.request.compressor) for r in self.batch)

    def _fits_beside_running(self, ids: list[int], req: GenerationRequest) -> bool:
        """Whether the request could fit now if every prefix-cache snapshot were evicted (always, with nothing
        running: then it either fits or gets 503)."""
        return not self.batch or held_nbytes(self._caches()) + self._reserve(ids, 0, req) <= self.config.kv_budget

    def _room(self, ids: list[int], done: int, req: GenerationRequest) -> bool:
        """Evict snapshots until what the request being prefilled and the running ones may still add fits under
        the budget, beside the caches they hold."""
        return self.prefix.make_room(self._reserve(ids, done, req), live=self._caches())

    def _caches(self) -> list[KVFoldCache]:
        """The caches the running requests (and the one being prefilled) hold."""
        admitting = [self._admitting_cache] if self._admitting_cache is not None else []
        return [running.cache for running in self.batch] + admitting

    def _live_bytes(self) -> int:
        return sum(cache.referenced_nbytes() for cache in self._caches())

    def _cancelled(self, req: GenerationRequest, usage: Usage) -> None:
        self.metrics.add("cancelled")
        logger.info("request %s cancelled by the client after %d tokens", req.request_id, usage.completion_tokens)

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.device)

    @staticmethod
    def _post_text(job: Job, delta: str) -> None:
        if delta:
            job.post(Event("delta", text=delta))


class _Wait(Exception):
    """The request does not fit next to the running ones: it waits at the head of the queue."""
