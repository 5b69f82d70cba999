"""The FastAPI router: routes, auth, error rendering. Thin on purpose; the handlers do the work.

`build_app(engine, settings)` makes an app around any `Engine` (tests pass a LocalEngine or a
RelayEngine); the CLI runs it with uvicorn. Every error leaves in OpenAI's shape
{"error": {"message", "type", "param", "code"}}; validation errors are 400 as OpenAI returns them.
Bodies pass `BodyGuard` (size cap, read deadline) before routing. With an API key, the /v1 routes and
the schema pages (/docs, /openapi.json) need it; /health and /metrics stay open for probes.
TLS is the server's business (uvicorn, see cli.py), not the app's.
"""
from __future__ import annotations

import contextlib
import hmac
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.admission import Admission
from serving.body_guard import BodyGuard
from serving.encoding import json_dumps
from serving.engine import Engine
from serving.errors import APIError
from serving.metrics import Metrics
from serving.protocol import ChatCompletionRequest, CompletionRequest, ExitCard, ModelCard, ModelList
from serving.serving_chat import OpenAIServingChat
from serving.serving_completion import OpenAIServingCompletion
from serving.settings import ServeSettings

_ENDPOINT = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}


class StrictJSONResponse(JSONResponse):
    """JSON with finite numbers only and ASCII escapes (see `encoding.json_dumps`)."""

    def render(self, content) -> bytes:
        return json_dumps(content).encode()


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its body iterator, so a gone client frees its sessions
    at once rather than when the iterator is garbage-collected."""

    media_type = "text/event-stream"

    def __init__(self, stream, **kw):
        super().__init__(stream, **kw)
        self._stream = stream   # StreamingResponse may wrap it; keep the object whose aclose frees the slot

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self._stream.aclose()


def build_app(engine: Engine, settings: ServeSettings | None = None, *, start_engine: bool = True) -> FastAPI:
    settings = settings or ServeSettings()
    metrics = Metrics()
    admission = Admission(settings, metrics)
    completion = OpenAIServingCompletion(engine, settings, metrics, admission)
    chat = OpenAIServingChat(engine, settings, metrics, admission)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_engine:
            await engine.start()
        yield
        await engine.close()

    locked = settings.api_key is not None   # with a key, the schema pages are served below, behind it
    app = FastAPI(title="Familial", lifespan=lifespan, default_response_class=StrictJSONResponse,
                  docs_url=None if locked else "/docs", redoc_url=None if locked else "/redoc",
                  openapi_url=None if locked else "/openapi.json")
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           type="invalid_request_error", code="invalid_api_key")

    def _count_path(path: str, status: int) -> None:
        ep = _ENDPOINT.get(path)
        if ep:
            metrics.requests.labels(ep, str(status)).inc()

    def _count(request: Request, status: int) -> None:
        _count_path(request.url.path, status)

    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       on_reject=_count_path)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        _count(request, e.status)
        return StrictJSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = err.get("msg", "invalid request").removeprefix("Value error, ")
        return await _api_error(request, APIError(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}",
                                                  param=loc[0] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return await _api_error(request, APIError(e.status_code, str(e.detail), code=None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return await _api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    async def _respond(handler, req, request: Request):
        arrival = time.perf_counter()
        out = await handler.create(req, arrival, request.is_disconnected)
        if isinstance(out, dict):
            _count(request, 200)
            return StrictJSONResponse(out)
        return SSEResponse(out, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def create_completion(req: CompletionRequest, request: Request):
        return await _respond(completion, req, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def create_chat_completion(req: ChatCompletionRequest, request: Request):
        return await _respond(chat, req, request)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        info = engine.info
        card = ModelCard(id=settings.model_name or info.name, tiers=info.tiers,
                         exits=[ExitCard(index=e.index, layer=e.layer, tier=e.tier, val_loss=e.val_loss)
                                for e in info.exits])
        out = ModelList(data=[card]).model_dump()
        out["data"][0]["latency_model"] = engine.latency_model()
        return out

    if locked:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
        async def openapi_schema():
            return app.openapi()

        @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_key)])
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="Familial - docs")

    @app.head("/health", include_in_schema=False)   # load balancers probe with HEAD
    @app.get("/health")
    async def health():
        try:
            tiers = await engine.check_health()
        except Exception as e:  # noqa: BLE001
            tiers, err = {}, str(e)
        else:
            err = None
        ok = bool(tiers) and all(tiers.values())
        body = {"status": "ok" if ok else "degraded", "tiers": tiers}
        if err:
            body["error"] = err
        return StrictJSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    return app
