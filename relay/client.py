"""Async client for a relay chain, used by the HTTP router (and by each node to reach the next tier).

The router talks only to the head node (device tier): it opens a session, sends the new token ids of
each step with their start position, and gets back one token plus which exit/tier produced it, whether
the answer was degraded, confidence stats and a per-tier/per-hop timing split. Everything about
hidden states, pending positions and replay stays inside the nodes. This file knows nothing about
HTTP, tokenization or exit planning.

    c = RelayClient("127.0.0.1:50051")
    sid = await c.open_session()
    r = await c.forward(sid, prompt_ids, pos=0, exit=2)          # prefill + first token
    r = await c.forward(sid, [r.token], pos=len(prompt_ids))      # one decode step, deepest exit
    await c.close_session(sid); await c.close()

Failures raise `RelayError` with the gRPC status name in `.code` ("NOT_FOUND", "INVALID_ARGUMENT",
"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED", "UNAVAILABLE", ...).
"""
from __future__ import annotations

import math

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay.pb import pb, pb_grpc
from relay.types import ExitPolicy, Sampling, StepResult, TLSConfig

__all__ = ["RelayClient", "RelayError", "ExitPolicy", "Sampling", "StepResult", "TLSConfig", "make_channel"]

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


class RelayClient:
    def __init__(self, target: str, *, tls: TLSConfig | None = None, timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.target, self.timeout_s = target, timeout_s
        self._channel = make_channel(target, tls, max_message_bytes)
        self._stub = pb_grpc.RelayStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._n = 0

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=self.timeout_s if timeout is None else timeout)
        except grpc.aio.AioRpcError as e:
            raise RelayError.wrap(e) from None

    async def open_session(self, session_id: str | None = None, max_tokens: int | None = None) -> str:
        r = await self._call(self._stub.OpenSession,
                             pb.OpenSessionRequest(session_id=session_id or "", max_tokens=max_tokens or 0))
        return r.session_id

    async def forward(self, session_id: str, token_ids: list[int], pos: int, *, exit: int | None = None,
                      policy: ExitPolicy | None = None, sampling: Sampling | None = None,
                      deadline_s: float | None = None, request_id: str | None = None) -> StepResult:
        """Send token ids for positions [pos, pos+len(token_ids)); get the next token.

        exit: deepest exit wanted (fixed exit unless `policy` is a confidence policy); None = deepest.
        deadline_s: gRPC deadline for the whole chain (default: the client's timeout_s). Deeper tiers
        that cannot answer in time yield a degraded answer from a shallower exit, not an error.
        """
        self._n += 1
        req = pb.ForwardRequest(session_id=session_id, request_id=request_id or f"{session_id}:{self._n}",
                                pos=int(pos), tokens=pb.TokenIds(ids=[int(t) for t in token_ids]),
                                policy=(policy or ExitPolicy()).to_pb(), sampling=(sampling or Sampling()).to_pb())
        if exit is not None:
            req.max_exit = int(exit)
        return StepResult.from_pb(await self._call(self._stub.Forward, req, deadline_s))

    async def close_session(self, session_id: str) -> bool:
        r = await self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
        return r.existed

    async def stats(self) -> dict:
        r = await self._call(self._stub.Stats, pb.StatsRequest())
        return {
            "tier": r.tier, "exits": list(r.exits), "layers": (r.start_layer, r.stop_layer), "next": r.next,
            "live_sessions": len(r.sessions), "total_bytes": r.total_bytes, "evicted": r.evicted,
            "served": r.served,
            "limits": {"max_sessions": r.max_sessions, "max_tokens": r.max_tokens, "max_total_bytes": r.max_total_bytes},
            "sessions": {s.session_id: {"length": s.length, "kv_bytes": s.kv_bytes, "log_bytes": s.log_bytes,
                                        "acked": s.acked, "idle_s": s.idle_s} for s in r.sessions},
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
