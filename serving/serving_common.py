"""What both OpenAI endpoints share: errors, admission (concurrency limit, 429), request checks (a
prompt too long is refused by its byte count before it is tokenized; tokenizing runs in a worker
thread, off the event loop), `RequestRun`, which drives one request through the engine and turns token
ids into text deltas (incremental detokenisation with `trunk.detokenize`, stop strings, the tokenizer's
EOS list) while keeping the Familial summary and the metrics, and `json_dumps`, the one JSON encoder of
every response and SSE line (finite numbers only).

Handlers (`serving_completion.py`, `serving_chat.py`) only shape responses; the FastAPI router
(`app.py`) only wires routes. Nothing here imports the transport beyond raising `APIError`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator

from serving.engine import Engine, EngineError, GenerateRequest, SamplingParams, TokenOutput
from serving.metrics import Metrics
from serving.protocol import ErrorInfo, ErrorResponse, FamilialInfo, LatencySplit, ReplanInfo, UsageInfo
from serving.settings import ServeSettings
from trunk.detokenize import StreamDecoder

SPLIT_KEYS = ("device", "network", "edge", "cloud")


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


def finite(obj):
    """`obj` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_dumps(obj) -> str:
    """Strict JSON (allow_nan=False after `finite`), ASCII-only so no string can break the encoding."""
    return json.dumps(finite(obj), allow_nan=False)


# ---- admission ------------------------------------------------------------------------------------

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


# ---- request checks -------------------------------------------------------------------------------

_MAX_TOKEN_BYTES: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_MIN_TOKEN_BYTES_BOUND = 16  # covers special-token strings ("<|endoftext|>") that `decode` skips


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token can stand for: the longest decoded token,
    and at least 16 for special-token strings. Computed once per tokenizer (one decode per id)."""
    try:
        return _MAX_TOKEN_BYTES[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = getattr(tokenizer, "vocab_size", 0) or 0
    longest = max((len(tokenizer.decode([i]).encode("utf-8")) for i in range(vocab)), default=0)
    n = max(longest, _MIN_TOKEN_BYTES_BOUND)
    with contextlib.suppress(TypeError):
        _MAX_TOKEN_BYTES[tokenizer] = n
    return n


def prompt_token_limit(engine: Engine, settings: ServeSettings) -> int:
    return min(settings.max_prompt_tokens, engine.info.max_seq_len - 1)


def _too_long(n_tokens: int, limit: int) -> APIError:
    return APIError(400, f"prompt is {n_tokens} tokens; the limit is {limit}", param="prompt",
                    code="context_length_exceeded")


async def encode_prompt(engine: Engine, settings: ServeSettings, text: str) -> list[int]:
    """Token ids of `text`, tokenized in a worker thread. A text longer than the token limit times the
    most bytes one token can cover has more tokens than the limit for sure, and is refused untokenized."""
    limit = prompt_token_limit(engine, settings)
    nbytes = len(text.encode("utf-8"))
    if nbytes > limit:  # only then can it be too long; the bound costs one pass over the vocabulary
        per_token = await asyncio.to_thread(max_token_bytes, engine.tokenizer)
        if nbytes > limit * per_token:
            raise APIError(400, f"prompt is {nbytes} bytes, more than {limit} tokens can hold (at most "
                                f"{per_token} bytes each); the limit is {limit} tokens", param="prompt",
                           code="context_length_exceeded")
    return await asyncio.to_thread(engine.tokenizer.encode, text)


def resolve_exit(engine: Engine, exit) -> int | None:
    """"auto" -> None (choose by budget); an index; or a tier name -> that tier's best exit."""
    exits = engine.info.exits
    if isinstance(exit, str) and exit.strip().lstrip("-").isdigit():
        exit = int(exit)
    if isinstance(exit, int) and not isinstance(exit, bool):
        if not 0 <= exit < len(exits):
            raise APIError(400, f"exit {exit} out of range: this family has exits 0..{len(exits) - 1}", param="exit")
        return exit
    if exit == "auto":
        return None
    on_tier = [e for e in engine.planner.by_quality if e.tier == exit]
    if not on_tier:
        raise APIError(400, f"exit must be 'auto', an exit index or a tier name ({', '.join(engine.info.tiers)}); "
                            f"got {exit!r}", param="exit")
    return on_tier[0].index


def check_model(settings: ServeSettings, engine: Engine, model: str | None) -> str:
    name = settings.model_name or engine.info.name
    if model not in (None, "", name):
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{name}'", param="model",
                       code="model_not_found")
    return name


def build_request(engine: Engine, settings: ServeSettings, prompt_ids: list[int], max_tokens: int | None,
                  req, arrival_s: float) -> GenerateRequest:
    if not prompt_ids:
        raise APIError(400, "prompt must not be empty", param="prompt")
    limit = prompt_token_limit(engine, settings)
    if len(prompt_ids) > limit:
        raise _too_long(len(prompt_ids), limit)
    vocab = getattr(engine.tokenizer, "vocab_size", None) or (1 << 62)
    if any((not isinstance(t, int)) or not 0 <= t < vocab for t in prompt_ids):
        raise APIError(400, f"token ids in prompt must be integers in [0, {vocab})", param="prompt")
    n = settings.default_max_tokens if max_tokens is None else max_tokens
    if n > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens is {n}; the limit is {settings.max_tokens_limit}", param="max_tokens")
    if len(prompt_ids) + n > engine.info.max_seq_len:
        raise APIError(400, f"prompt ({len(prompt_ids)}) + max_tokens ({n}) exceeds the context length "
                            f"{engine.info.max_seq_len}", param="max_tokens", code="context_length_exceeded")
    seed = req.seed if req.seed is not None else uuid.uuid4().int & 0x7FFFFFFF
    return GenerateRequest(request_id=uuid.uuid4().hex, prompt_ids=list(prompt_ids), max_tokens=n,
                           sampling=SamplingParams(req.temperature if req.temperature is not None else 1.0,
                                                   req.top_p if req.top_p is not None else 1.0, seed),
                           exit=resolve_exit(engine, req.exit), budget_ms=req.latency_budget_ms, arrival_s=arrival_s,
                           ignore_eos=req.ignore_eos)


# ---- one request through the engine ---------------------------------------------------------------

@dataclass
class Delta:
    text: str
    exits: list[int]
    tiers: list[str]
    finish_reason: str | None = None


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could start a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


@dataclass
class RequestRun:
    engine: Engine
    metrics: Metrics
    req: GenerateRequest
    stops: list[str]
    exit_requested: object = "auto"
    queue_ms: float = 0.0
    ids: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    split: dict[str, float] = field(default_factory=dict)
    replans: list[ReplanInfo] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    infeasible: bool = False
    predicted_ms: float | None = None
    finish_reason: str | None = None
    e2e_ms: float = 0.0
    first_token_s: float | None = None

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas; the last one carries finish_reason. Raises APIError(503) if nothing could be made."""
        sent, pending_exits, pending_tiers = 0, [], []
        text = ""
        last_s = None
        tok = self.engine.tokenizer
        eos_ids = set(getattr(tok, "eos_ids", (tok.eos_id,)))  # a model may end on any of several ids
        stream = StreamDecoder(tok, self.req.prompt_ids)  # holds back incomplete UTF-8 sequences
        gen = self.engine.generate(self.req)
        async with contextlib.aclosing(gen):
            try:
                async for out in gen:
                    last_s = self._record(out, last_s)
                    pending_exits.append(out.exit)
                    pending_tiers.append(out.tier)
                    eos = out.token_id in eos_ids
                    if not eos:
                        self.ids.append(out.token_id)
                        text += stream.step(out.token_id)
                    finish = "stop" if eos and not self.req.ignore_eos else out.finish_reason
                    if finish:
                        text += stream.flush()
                    hit = self._find_stop(text, sent)
                    if hit is not None:
                        text, self.finish_reason = text[:hit], "stop"
                    elif finish:
                        self.finish_reason = finish
                    if self.finish_reason:
                        break
                    safe = len(text) - _holdback(text, self.stops)
                    if safe > sent:
                        yield Delta(text[sent:safe], pending_exits, pending_tiers)
                        sent, pending_exits, pending_tiers = safe, [], []
            except EngineError as e:
                if not self.exits:
                    raise APIError(503, f"the model is unavailable: {e}", type="server_error",
                                   code="engine_unavailable") from e
                self.degraded.append(str(e))
                text += stream.flush()
                self.finish_reason = "error"   # cut short: never "stop", which would claim a finished answer
        self._finish()
        yield Delta(text[sent:], pending_exits, pending_tiers, self.finish_reason or "stop")

    def _record(self, out: TokenOutput, last_s: float | None) -> float:
        now = time.perf_counter()
        m = self.metrics
        if last_s is None:
            self.first_token_s = now
            m.ttft.observe(now - self.req.arrival_s)
        else:
            m.tpot.observe(now - last_s)
        self.exits.append(out.exit)
        self.tiers.append(out.tier)
        m.tokens_by_exit.labels(str(out.exit), out.tier).inc()
        if out.decision_us:
            m.decision.observe(out.decision_us / 1e6)
        for k, v in out.latency_ms.items():
            self.split[k] = self.split.get(k, 0.0) + v
        if out.degraded:
            self.degraded.append(out.reason or "degraded")
        if out.infeasible:
            self.infeasible = True
        if out.predicted_ms is not None:
            self.predicted_ms = round(out.predicted_ms, 3)
        if out.replan:
            self.replans.append(ReplanInfo.model_validate(out.replan, from_attributes=True))
        return now

    def _find_stop(self, text: str, sent: int) -> int | None:
        hits = [i for s in self.stops if (i := text.find(s, max(0, sent - len(s)))) >= 0]
        return min(hits) if hits else None

    def _finish(self) -> None:
        m = self.metrics
        self.e2e_ms = (time.perf_counter() - self.req.arrival_s) * 1e3
        m.e2e.observe(self.e2e_ms / 1e3)
        m.prompt_tokens.inc(len(self.req.prompt_ids))
        m.generation_tokens.inc(len(self.exits))
        if self.req.budget_ms is not None:
            m.budget_requests.inc()
            if self.e2e_ms > self.req.budget_ms:
                m.budget_misses.inc()
        if self.infeasible:
            m.infeasible.inc()
        if self.replans:
            m.replans.inc(len(self.replans))
        if self.degraded:
            m.degraded.inc()

    # ---- response pieces -----------------------------------------------------------------------
    def usage(self) -> UsageInfo:
        n = len(self.exits)
        return UsageInfo(prompt_tokens=len(self.req.prompt_ids), completion_tokens=n,
                         total_tokens=len(self.req.prompt_ids) + n)

    def summary(self, exits: list[int], tiers: list[str]) -> FamilialInfo:
        split = LatencySplit(queue=round(self.queue_ms, 3), total=round(self.e2e_ms, 3),
                             **{k: round(self.split.get(k, 0.0), 3) for k in SPLIT_KEYS})
        budget = self.req.budget_ms
        return FamilialInfo(exits=exits, tiers=tiers, exit_requested=self.exit_requested, latency_budget_ms=budget,
                            budget_met=None if budget is None else self.e2e_ms <= budget, predicted_ms=self.predicted_ms,
                            infeasible=self.infeasible, replans=self.replans, degraded=bool(self.degraded),
                            degraded_reasons=self.degraded or None, latency_ms=split)


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


def dump(model) -> dict:
    """A response model as a dict, dropping only empty Familial extension fields (the OpenAI fields stay,
    null included, so the `openai` client finds every attribute it expects)."""
    d = model.model_dump()
    for c in d.get("choices", []):
        if c.get("familial") is None:
            c.pop("familial", None)
        else:
            c["familial"] = {k: v for k, v in c["familial"].items() if v is not None}
    return d
