"""Async clients of a relay chain: `GenerateStream` (the router's path) and `RelayClient` (sessions,
stats, health, family info; also what tests and tools use).

The router opens one `GenerateStream` to the head node and submits whole requests on it; the head's
engine runs the decode loop and sends token events back, batched per engine step; replans go as
`update`, disconnects as `abort`. Everything about hidden states, pending positions and replay stays in
the nodes. This file knows nothing about HTTP, tokenization or exit planning.

    async with RelayClient("127.0.0.1:50051") as c:
        stream = c.generate_stream()
        async for ev in stream.submit(GenRequest("r1", prompt_ids, max_tokens=16, exit=2)):
            print(ev.token, ev.exit, ev.tier, ev.finish_reason)

    sid = await c.open_session()                                   # step by step, one sequence
    r = await c.forward(sid, prompt_ids, pos=0, exit=2)            # prefill + first token (a Result)
    r = await c.forward(sid, [r.token], pos=len(prompt_ids))       # one decode step, deepest exit

Failures raise `RelayError` with the gRPC status name in `.code`.
"""
from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay import wire
from relay.pb import pb, pb_grpc
from relay.types import TLSConfig
from relay.work import GenRequest, Result, TokenEvent
from trunk.sampling import ExitPolicy, SamplingParams

__all__ = ["RelayClient", "RelayError", "GenerateStream", "TLSConfig", "make_channel"]

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class RelayError(RuntimeError):
    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details

    @classmethod
    def wrap(cls, e: grpc.aio.AioRpcError) -> "RelayError":
        return cls(e.code().name, e.details() or "")


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: TLSConfig | None = None) -> list:
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A tier that comes back must be found again within a few hundred ms, not gRPC's default
        # minute-long backoff, so the next deep request can replay what it missed.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def make_channel(target: str, tls: TLSConfig | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    opts = channel_options(max_message_bytes, tls)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=opts)


class GenerateStream:
    """One `Generate` stream to the head: many requests at once, each an async iterator of events."""

    def __init__(self, stub, metadata=None):
        self._stub, self._metadata = stub, metadata
        self._calls: asyncio.Queue = asyncio.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._call = None
        self._reader: asyncio.Task | None = None
        self.error: RelayError | None = None

    async def _requests(self):
        while True:
            c = await self._calls.get()
            if c is None:
                return
            yield c

    def _ensure(self) -> None:
        if self._call is None:
            self._call = self._stub.Generate(self._requests(), metadata=self._metadata)
            self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for batch in self._call:
                for ev in batch.events:
                    q = self._queues.get(ev.request_id)
                    if q is not None:
                        q.put_nowait(wire.event_from_pb(ev))
        except grpc.aio.AioRpcError as e:
            self.error = RelayError.wrap(e)
        except asyncio.CancelledError:
            pass
        finally:  # the stream is gone: every open request ends with an error event
            err = self.error or RelayError("UNAVAILABLE", "generate stream closed")
            for q in self._queues.values():
                q.put_nowait(TokenEvent(-1, -1, "", 0, finish_reason="error", error=str(err)))
            self._call = None

    async def submit(self, req: GenRequest, deadline_ms: float = 0.0) -> AsyncIterator[TokenEvent]:
        """Run a request; leaving the iterator before its last event aborts it on every tier."""
        if req.request_id in self._queues:
            raise RelayError("ALREADY_EXISTS", f"request {req.request_id!r} is running on this stream")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req.request_id] = q
        self._ensure()
        self._calls.put_nowait(pb.GenerateCall(submit=wire.gen_to_pb(req, deadline_ms)))
        done = False
        try:
            while not done:
                ev = await q.get()
                done = ev.finish_reason is not None
                yield ev
        finally:
            self._queues.pop(req.request_id, None)
            if not done and self._call is not None:
                self._calls.put_nowait(pb.GenerateCall(abort=pb.AbortRequest(request_id=req.request_id)))

    def update(self, request_id: str, exit: int | None) -> None:
        if self._call is not None and request_id in self._queues:
            m = pb.UpdateRequest(request_id=request_id)
            if exit is not None:
                m.exit = exit
            self._calls.put_nowait(pb.GenerateCall(update=m))

    def abort(self, request_id: str) -> None:
        if self._call is not None and request_id in self._queues:
            self._calls.put_nowait(pb.GenerateCall(abort=pb.AbortRequest(request_id=request_id)))

    async def close(self) -> None:
        self._calls.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()


class RelayClient:
    def __init__(self, target: str, *, tls: TLSConfig | None = None, timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, admin_token: str | None = None,
                 node_token: str | None = None):
        self.target, self.timeout_s = target, timeout_s
        self._channel = make_channel(target, tls, max_message_bytes)
        self._stub = pb_grpc.RelayStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        md = []
        if admin_token:
            md.append(("x-familial-admin-token", admin_token))
        if node_token:
            md.append(("x-familial-node-token", node_token))
        self._metadata = tuple(md) or None
        self.capabilities: dict[str, str] = {}   # session id -> capability from OpenSession
        self._n = 0

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=self.timeout_s if timeout is None else timeout,
                                metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise RelayError.wrap(e) from None

    def generate_stream(self) -> GenerateStream:
        return GenerateStream(self._stub, self._metadata)

    async def open_session(self, session_id: str | None = None, max_tokens: int | None = None) -> str:
        r = await self._call(self._stub.OpenSession,
                             pb.OpenSessionRequest(session_id=session_id or "", max_tokens=max_tokens or 0))
        self.capabilities[r.session_id] = r.capability
        return r.session_id

    async def forward(self, session_id: str, token_ids: list[int], pos: int, *, exit: int | None = None,
                      policy: ExitPolicy | None = None, sampling: SamplingParams | None = None,
                      deadline_s: float | None = None, request_id: str | None = None) -> Result:
        """Send token ids for positions [pos, pos+len(token_ids)); get the next token (a `Result`).

        exit: deepest exit wanted (fixed exit unless `policy` is a confidence policy); None = deepest.
        Deeper tiers that cannot answer within deadline_s yield a degraded answer, not an error."""
        self._n += 1
        req = pb.ForwardRequest(session_id=session_id, request_id=request_id or f"{session_id}:{self._n}",
                                pos=int(pos), tokens=pb.TokenIds(ids=[int(t) for t in token_ids]),
                                policy=wire.policy_to_pb(policy or ExitPolicy()),
                                sampling=wire.sampling_to_pb(sampling or SamplingParams()),
                                capability=self.capabilities.get(session_id, ""))
        if exit is not None:
            req.max_exit = int(exit)
        r = await self._call(self._stub.Forward, req, deadline_s)
        return Result(int(r.token), int(r.exit), r.tier, r.degraded, r.reason, wire.confidence_from_pb(r.confidence),
                      wire.timings_from_pb(r.tiers, r.hops) | {"total": r.total_ms}, int(r.length),
                      total_ms=r.total_ms)

    async def close_session(self, session_id: str) -> bool:
        r = await self._call(self._stub.CloseSession,
                             pb.CloseSessionRequest(session_id=session_id,
                                                    capability=self.capabilities.pop(session_id, "")))
        return r.existed

    async def stats(self) -> dict:
        r = await self._call(self._stub.Stats, pb.StatsRequest())
        return {
            "tier": r.tier, "exits": list(r.exits), "layers": (r.start_layer, r.stop_layer), "next": r.next,
            "live_sessions": r.live_sessions, "total_bytes": r.total_bytes, "evicted": r.evicted,
            "served": r.served, "running": r.running,
            "pool": {"slots": r.pool_slots, "free_slots": r.pool_free_slots, "bytes_per_token": r.pool_bytes_per_token,
                     "max_len": r.pool_max_len},
            "engine": {"steps": r.steps, "rows": r.rows, "degraded": r.degraded, "replays": r.replays,
                       "stage_s": r.stage_s},
            "process": {"cpu_s": r.cpu_s, "uptime_s": r.uptime_s},
            "limits": {"max_sessions": r.max_sessions, "max_tokens": r.max_tokens, "max_total_bytes": r.max_total_bytes},
            "sessions": {s.session_id: {"length": s.length, "kv_bytes": s.kv_bytes, "acked": s.acked,
                                        "idle_s": s.idle_s} for s in r.sessions},
        }

    async def health(self, service: str = "") -> bool:
        try:
            r = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    async def family_info(self) -> dict:
        """{"n_exits", "complete", "tiers": [{"tier", "layers", "onnx", "address", "wire_dtype",
        "exits": [{"index", "layer", "val_loss"}]}]}, head first."""
        r = await self._call(self._stub.FamilyInfo, pb.FamilyInfoRequest())
        return {"n_exits": r.n_exits, "complete": r.complete, "tiers": [
            {"tier": t.tier, "layers": (t.start_layer, t.stop_layer), "onnx": t.onnx, "address": t.address,
             "wire_dtype": t.wire_dtype,
             "exits": [{"index": e.index, "layer": e.layer, "val_loss": None if math.isnan(e.val_loss) else e.val_loss}
                       for e in t.exits]} for t in r.tiers]}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
