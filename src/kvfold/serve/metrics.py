"""Counters the server keeps, and their Prometheus text exposition (`/metrics`)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
RATE_WINDOW_S = 60.0  # kvfold_tokens_per_second averages over this many seconds


class Metrics:
    """Thread-safe counters: the HTTP side records requests, the engine records tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started, self.started_wall = time.monotonic(), time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.totals: Counter[str] = Counter()  # generated, prompt, prefilled, reused tokens; cancelled; ...
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S seconds

    def record_request(self, path: str, status: int) -> None:
        with self._lock:
            label = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.requests[(label, status)] += 1

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.totals[name] += value
            if name == "generated_tokens" and value:
                now = time.monotonic()
                self._recent.append((now, value))
                self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last minute (or since start, if sooner)."""
        with self._lock:
            now = time.monotonic()
            self._trim(now)
            span = min(RATE_WINDOW_S, max(now - self.started, 1e-9))
            return sum(n for _, n in self._recent) / span

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Prometheus text format 0.0.4. `gauges`: name -> (help, value), read from the engine at scrape time."""
        with self._lock:
            requests, totals = dict(self.requests), dict(self.totals)
        lines = ["# HELP kvfold_requests_total HTTP requests answered, by endpoint and status code.",
                 "# TYPE kvfold_requests_total counter"]
        for (path, status), count in sorted(requests.items()):
            lines.append(f'kvfold_requests_total{{endpoint="{path}",status="{status}"}} {count}')
        counters = {
            "generated_tokens": "Tokens generated (completion tokens).",
            "prompt_tokens": "Prompt tokens of requests that ran.",
            "prefilled_tokens": "Prompt tokens actually prefilled (not reused from the prefix cache).",
            "reused_tokens": "Prompt tokens reused from prefix-cache snapshots.",
            "cancelled": "Requests stopped because the client went away.",
            "prefix_cache_hits": "Prompts with at least one full block that reused a prefix-cache snapshot.",
            "prefix_cache_misses": "Prompts with at least one full block that found no snapshot.",
            "prefix_cache_evictions": "Prefix-cache snapshots evicted (LRU, under the KV budget).",
        }
        for name, help_text in counters.items():
            value = gauges.pop(name)[1] if name in gauges else totals.get(name, 0)
            lines += [f"# HELP kvfold_{name}_total {help_text}", f"# TYPE kvfold_{name}_total counter",
                      f"kvfold_{name}_total {_number(value)}"]
        gauges = {"tokens_per_second": ("Generated tokens per second over the last minute.",
                                        self.tokens_per_second()), **gauges}
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP kvfold_{name} {help_text}", f"# TYPE kvfold_{name} gauge",
                      f"kvfold_{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Exact integers (no 6-digit %g rounding of byte counts), floats as Python writes them."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
