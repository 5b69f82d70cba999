"""Admission: at most `max_concurrency` requests generate at once and `max_queue` more wait for a slot;
any further request is refused at once with 429 and `Retry-After` (as OpenAI's rate limits answer).

Checks of what a request asks for (prompt length, max_tokens, exit) are `validation.py`'s; this file
only counts requests, and keeps the running/waiting gauges.
"""
from __future__ import annotations

import asyncio
import contextlib

from serving.errors import APIError
from serving.metrics import Metrics
from serving.settings import ServeSettings


class Admission:
    """At most `max_concurrency` requests generate; `max_queue` more wait; the rest get 429."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        self.running = self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        s = self.settings
        if self.running + self.waiting >= s.max_concurrency + s.max_queue:
            raise APIError(429, f"server is at capacity ({s.max_concurrency} running, {s.max_queue} queued); "
                                f"retry after {s.retry_after_s} s", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(s.retry_after_s)})
        self.waiting += 1
        self.metrics.waiting.set(self.waiting)
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.set(self.waiting)
        self.running += 1
        self.metrics.running.set(self.running)
        try:
            yield
        finally:
            self.running -= 1
            self.metrics.running.set(self.running)
            self._sem.release()
