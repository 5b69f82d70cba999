"""`APIError`: every refusal of the HTTP face, with its status and OpenAI's error body
{"error": {"message", "type", "param", "code"}}.

Handlers and middleware raise it; the router (`app.py`) renders it, and an SSE stream that fails after
its first byte sends its body as the last `data:` line. Nothing here knows the transport.
"""
from __future__ import annotations

from serving.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()
