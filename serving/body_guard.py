"""Request-body limits, as ASGI middleware in front of the FastAPI app: a size cap and a read deadline.

uvicorn reads a body as fast as the client sends it, without a size limit or a timeout, and FastAPI
then parses all of it on the event loop. So before the app sees a request, `BodyGuard` reads the body
itself: a declared `Content-Length` over the cap is refused at once (413, nothing read); a chunked body
is counted and refused (413) as soon as it passes the cap; a body that has not fully arrived within
`timeout_s` of the headers (a half-open or trickling client) gets 408. Both close the connection. A
body within limits is handed to the app unchanged, and later `receive` calls (disconnects) pass through.

This file knows nothing of the OpenAI schema beyond the shape of its error body; what a prompt may hold
is checked by the handlers (`validation.py`).
"""
from __future__ import annotations

import asyncio

from serving.encoding import json_dumps
from serving.errors import APIError


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


class BodyGuard:
    def __init__(self, app, max_bytes: int, timeout_s: float, on_reject=None):
        """`on_reject(path, status)` is called for every request refused here (metrics)."""
        self.app, self.max_bytes, self.timeout_s, self.on_reject = app, max_bytes, timeout_s, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(scope, send, 413, self._too_large(declared))
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _TooLarge:
            return await self._refuse(scope, send, 413, self._too_large(None))
        except _Gone:
            return None
        except TimeoutError:
            return await self._refuse(scope, send, 408, APIError(
                408, f"the request body did not arrive within {self.timeout_s:g} s", code="request_timeout"))
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Gone
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, declared: int | None) -> APIError:
        got = f"{declared} bytes" if declared is not None else "more than that"
        return APIError(413, f"request body is {got}; the limit is {self.max_bytes} bytes (--max-body-mb)",
                        code="request_too_large")

    async def _refuse(self, scope, send, status: int, err: APIError) -> None:
        if self.on_reject is not None:
            self.on_reject(scope.get("path", ""), status)
        body = json_dumps(err.body()).encode()
        # `connection: close`: the unread rest of the body must not be taken for the next request
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None  # h11 refuses a malformed length before the app is called
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
