"""`OpenAIServing`, the base of the endpoint handlers: admit a `RequestRun`, then deliver it whole
(waiting for the end, cancelled if the client goes away) or as Server-Sent Events.

SSE format: one `data: <json>` line per delta, an optional usage chunk, then `data: [DONE]`; an error
after the stream has begun is sent as one `data:` line holding OpenAI's error body, then `[DONE]`.
The admission slot is held until the response is over, however it ends. Handlers
(`serving_completion.py`, `serving_chat.py`) only shape responses; the router (`app.py`) only wires
routes; nothing here imports the transport beyond raising `APIError`.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

from serving.admission import Admission
from serving.encoding import dump, json_dumps
from serving.engine import Engine
from serving.errors import APIError
from serving.metrics import Metrics
from serving.request_run import RequestRun
from serving.settings import ServeSettings


class OpenAIServing:
    """Base of the endpoint handlers: admission, running a request to completion or as SSE."""

    endpoint = ""

    def __init__(self, engine: Engine, settings: ServeSettings, metrics: Metrics, admission: Admission):
        self.engine, self.settings, self.metrics, self.admission = engine, settings, metrics, admission

    async def start(self, run: RequestRun) -> contextlib.AsyncExitStack:
        """Admit `run` (waits for a slot, or raises 429); closing the returned stack frees the slot."""
        stack = contextlib.AsyncExitStack()
        try:
            t0 = time.perf_counter()
            await stack.enter_async_context(self.admission.slot())
        except BaseException:
            await stack.aclose()
            raise
        run.queue_ms = (time.perf_counter() - t0) * 1e3
        self.metrics.queue.observe(run.queue_ms / 1e3)
        return stack

    async def collect(self, run: RequestRun, is_disconnected) -> tuple[str, list]:
        """Run to the end (non-streaming); cancel if the client goes away. Returns text and deltas."""
        async def go():
            return [d async for d in run.deltas()]

        task = asyncio.create_task(go())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.settings.disconnect_poll_s)
                if done:
                    deltas = task.result()
                    return "".join(d.text for d in deltas), deltas
                if await is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise APIError(499, "client disconnected", code="client_closed_request")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def sse(self, stack: contextlib.AsyncExitStack, run: RequestRun, chunk, usage_chunk) -> "SSEStream":
        return SSEStream(self._sse(stack, run, chunk, usage_chunk), stack)

    async def _sse(self, stack: contextlib.AsyncExitStack, run: RequestRun, chunk, usage_chunk) -> AsyncIterator[str]:
        """SSE body: one `data:` line per delta (`chunk(delta)`), optional usage chunk, `[DONE]`.
        Holds the admission slot (`stack`) until the stream ends or the client disconnects."""
        try:
            async with contextlib.aclosing(run.deltas()) as deltas:
                async for d in deltas:
                    yield f"data: {json_dumps(dump(chunk(d)))}\n\n"
            if usage_chunk is not None:
                yield f"data: {json_dumps(dump(usage_chunk()))}\n\n"
            yield "data: [DONE]\n\n"
            self.metrics.requests.labels(self.endpoint, "200").inc()
        except APIError as e:
            self.metrics.requests.labels(self.endpoint, str(e.status)).inc()
            yield f"data: {json_dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.requests.labels(self.endpoint, "499").inc()
            raise
        finally:
            await stack.aclose()


class SSEStream:
    """The SSE body iterator plus what must be released even if iteration never starts (a client that
    leaves before the first byte): `aclose` closes the generator and the admission slot."""

    def __init__(self, gen, stack: contextlib.AsyncExitStack):
        self._gen, self._stack = gen, stack

    def __aiter__(self):
        return self._gen

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            await self._stack.aclose()
