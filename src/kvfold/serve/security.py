"""API keys (constant-time comparison), per-key rate limits (token buckets) and a capped body reader."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time

from starlette.requests import Request

from .protocol import APIError


class Authenticator:
    """Checks `Authorization: Bearer KEY` against the configured keys; with no keys every request passes."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, request: Request) -> str:
        """The caller's identity for rate limiting: a digest of its key, or its address when keys are off.
        Raises APIError 401 on a missing or wrong key."""
        if not self._keys:
            return f"addr:{request.client.host if request.client else 'unknown'}"
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        matched = False
        for key in self._keys:  # compare with every key, so the time taken does not tell which one was close
            matched |= hmac.compare_digest(given, key)
        if not given or not matched:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return "key:" + hashlib.sha256(given).hexdigest()[:16]


class RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute, bursts of up to `per_minute`."""

    def __init__(self, per_minute: int | None, clock=time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last refill time)
        self._lock = threading.Lock()

    def check(self, caller: str) -> None:
        """Take one token for `caller`, or raise APIError 429 with the seconds until one is back."""
        if self.per_minute is None:
            return
        rate = self.per_minute / 60.0
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(caller, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[caller] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / rate)
                raise APIError(429, f"rate limit of {self.per_minute} requests per minute reached: retry in "
                                    f"{wait} s", kind="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(wait)})
            self._buckets[caller] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget callers whose bucket is full again
                full = [c for c, (t, seen) in self._buckets.items() if t + (now - seen) * rate >= self.per_minute]
                for c in full:
                    del self._buckets[c]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or APIError 413 as soon as it passes `limit` bytes (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"request body over {limit} bytes: send a shorter prompt (the server's "
                            "--max-body-bytes)", code="body_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)
