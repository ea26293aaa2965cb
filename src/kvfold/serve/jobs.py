"""What travels between the HTTP side and the engine: a validated request, the job carrying its events back to
the asyncio loop, the bounded queue of jobs, a request in the decode batch, and the errors that become HTTP
statuses."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..cache import KVFoldCache
from ..compressor import Compressor
from ..errors import KVFoldError
from ..fastpath import Segments
from ..sampling import TextStream

logger = logging.getLogger("kvfold.serve")


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: token ids in, sampling settings (temperature 0 = greedy)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    compressor: Compressor
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Usage:
    """Token counts and KV bytes of one request, as answered in `usage` (with the `kvfold` extension)."""

    prompt_tokens: int
    reused_tokens: int
    method: str
    completion_tokens: int = 0
    kv_bytes: int = 0  # bytes the request's cache references (shared snapshot pages counted in full)

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "kvfold": {"method": self.method, "prefilled_tokens": self.prompt_tokens - self.reused_tokens,
                           "reused_tokens": self.reused_tokens, "kv_bytes": self.kv_bytes}}


@dataclass(frozen=True)
class Event:
    """kind: 'started' (prefill done), 'delta' (text), 'done' (finish_reason, usage) or 'error' (status)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    status: int = 200
    message: str = ""


@dataclass(eq=False)
class Job:
    """One request in flight: the engine posts `Event`s to `events` on the asyncio loop that made the job."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def fail(self, status: int, message: str) -> None:
        self.post(Event("error", status=status, message=message))

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    """The bounded queue has no room: answer 429 with Retry-After."""


class JobQueue:
    """A bounded FIFO the worker can be paused on; `unfinished` counts jobs queued or running."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize, self.paused, self.unfinished, self.closed = maxsize, False, 0, False
        self._items: deque[Job] = deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, job: Job) -> None:
        with self._cond:
            if len(self._items) >= self.maxsize:
                raise QueueFull
            self._items.append(job)
            self.unfinished += 1
            self._cond.notify()

    def put_front(self, job: Job) -> bool:
        """Give back a job `take` returned, to be taken first (it waits for room; still counted unfinished).
        False once the queue is closed (drained for shutdown): the caller must end the job."""
        with self._cond:
            if self.closed:
                return False
            self._items.appendleft(job)
            self._cond.notify()
            return True

    def take(self, timeout: float) -> Job | None:
        """The oldest job, or None if none is ready (or the queue is paused) within `timeout` seconds."""
        with self._cond:
            if self._cond.wait_for(lambda: self._items and not self.paused, timeout):
                return self._items.popleft()
            return None

    def finished(self) -> None:
        with self._cond:
            self.unfinished -= 1

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def drain(self) -> list[Job]:
        """Take every queued job out and close the queue to `put_front` (shutdown)."""
        with self._cond:
            self.closed = True
            jobs, self._items = list(self._items), deque()
            self.unfinished -= len(jobs)
            return jobs


class ServeError(Exception):
    """A request the server cannot run, with the HTTP status to answer (e.g. 503 when the KV budget is full)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(eq=False)
class Running:
    """A request in the decode batch: its cache, the logits of its next token and what it has produced."""

    job: Job
    cache: KVFoldCache
    usage: Usage
    text: TextStream
    generator: torch.Generator | None
    logits: torch.Tensor  # float32 [vocab] on the CPU
    started: float
    token: int = -1  # the token chosen this step, fed to the next forward
    segments: Segments | None = None  # the fast loop's clock for this request's cache, from its first decode step

    @property
    def request(self) -> GenerationRequest:
        return self.job.request


def error_status(err: BaseException, job: Job) -> tuple[int, str]:
    """The HTTP status and message a failure becomes (unexpected ones are logged with their traceback)."""
    if isinstance(err, ServeError):
        return err.status, err.message
    if isinstance(err, KVFoldError):
        return 400, str(err)
    logger.error("request %s failed", job.request.request_id, exc_info=err)
    return 500, "internal error while generating: see the server log"
