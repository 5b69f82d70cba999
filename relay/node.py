"""A relay tier node: a grpc.aio servicer holding one tier's stage and every session's KV cache.

Per Forward call (positions [pos, pos+T) of one session, under that session's lock):
1. run this tier's layers on the input (token ids at the head, boundary hidden states elsewhere),
   extending the session's KV cache; exit-branch layers run on every chunk that reaches their exit so
   their KV covers every position too; append the output to the session's boundary log;
2. if one of this tier's exits answers (the exit asked for, or the first that passes a confidence
   policy), sample the token from that exit's logits at the last position and reply;
3. otherwise send the next tier every pending position [acked, pos+T) in one message (chunked with
   `fill_only` only when it would exceed the message limit), with the remaining deadline minus a margin.
   If the next tier is down, too slow, or lost the session and cannot be reopened in time, answer from
   this tier's deepest exit with degraded=true. NOT_FOUND / FAILED_PRECONDITION from the next tier mean
   it lost (or has a gap in) the session: reopen it there and resend from position 0.
A hidden-state input that starts before the session's length is a replay: the cache is cut back to
`pos` and recomputed, so a tier that saw a request whose reply was lost stays consistent.

The compute of a step runs in a worker thread inside a task the RPC only *awaits* (shielded): a
cancelled or timed-out call never leaves a cache half-written. Nothing here knows about HTTP or
tokenizers; sessions and limits live in `relay/session.py`, the wire codec in `relay/codec.py`,
exit/sampling math in `relay/policy.py`.

Legend: B batch (1), T positions, D d_model, V vocab.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from relay import codec, policy as pol
from relay.client import DEFAULT_MAX_MESSAGE_BYTES, make_channel
from relay.codec import CodecError
from relay.pb import SERVICE_NAME, pb, pb_grpc
from relay.session import Limits, Session, SessionError, SessionTable
from relay.stage import exit_val_losses, new_cache
from relay.types import TLSConfig
from trunk.kv_cache import CacheError

log = logging.getLogger("familial.relay")


class Abort(Exception):
    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code = code


@dataclass
class NodeConfig:
    next: str | None = None                 # HOST:PORT of the next (deeper) tier
    next_tls: TLSConfig | None = None       # client credentials for dialing `next`
    limits: Limits = field(default_factory=Limits)
    wire_dtype: str = "auto"                # hidden states to the next tier: auto (= compute dtype, lossless) | float32 | float16 | bfloat16 | int8
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # both directions, server and client side
    deadline_margin_ms: float = 25.0        # kept back from the caller's deadline to answer degraded in time
    next_timeout_s: float = 30.0            # deadline for the next tier when the caller set none
    inject_delay_ms: float = 0.0            # TEST ONLY: added to this tier's compute per Forward
    onnx: bool = False                      # the stage runs on ONNX Runtime (reported in FamilyInfo)
    offload_compute: bool = True            # run the stage in a worker thread so the event loop keeps serving
                                            # other sessions, health checks and deadlines during a long prefill


class RelayNode(pb_grpc.RelayServicer):
    def __init__(self, stage, config: NodeConfig | None = None):
        self.stage, self.conf = stage, config or NodeConfig()
        self.cfg = stage.cfg
        self.tier = stage.tier
        self.dtype = getattr(stage, "dtype", torch.float32)
        self.wire = codec.wire_dtype_name(self.dtype) if self.conf.wire_dtype == "auto" else self.conf.wire_dtype
        if self.wire not in codec.WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {self.wire!r}")
        self.sessions = SessionTable(self.conf.limits, lambda n: new_cache(stage, n),
                                     keeps_log=not stage.is_last, model_max_tokens=self.cfg.max_seq_len)
        self.sessions.on_evict = self._evicted
        self.served = 0
        self._channel = self._stub = None
        if self.conf.next:
            self._channel = make_channel(self.conf.next, self.conf.next_tls, self.conf.max_message_bytes)
            self._stub = pb_grpc.RelayStub(self._channel)
        self._bg: set[asyncio.Task] = set()

    # ---- RPC entry points: map our exceptions to status codes, never crash ---------------------
    async def _guard(self, ctx, coro):
        try:
            return await coro
        except (Abort, SessionError) as e:
            code, msg = e.code, str(e)
        except (CodecError, pol.PolicyError) as e:
            code, msg = "INVALID_ARGUMENT", str(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug, not the caller's fault: say so, keep serving
            log.exception("internal error")
            code, msg = "INTERNAL", f"{type(e).__name__}: {e}"
        await ctx.abort(grpc.StatusCode[code], f"[{self.tier}] {msg}")

    async def OpenSession(self, req, ctx):
        return await self._guard(ctx, self._open(req))

    async def Forward(self, req, ctx):
        remaining = ctx.time_remaining()
        deadline = time.monotonic() + (self.conf.next_timeout_s if remaining is None else remaining)
        task = asyncio.ensure_future(self._forward(req, deadline))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if the RPC is gone
        return await self._guard(ctx, asyncio.shield(task))

    async def CloseSession(self, req, ctx):
        return await self._guard(ctx, self._close(req))

    async def Stats(self, req, ctx):
        return self._stats()

    async def FamilyInfo(self, req, ctx):
        return await self._guard(ctx, self._family_info())

    # ---- sessions ------------------------------------------------------------------------------
    async def _open(self, req):
        if len(req.session_id) > 256:
            raise Abort("INVALID_ARGUMENT", "session_id longer than 256 characters")
        s = self.sessions.open(req.session_id or None, int(req.max_tokens))
        return pb.OpenSessionReply(session_id=s.id, max_tokens=s.max_tokens)

    async def _close(self, req):
        s = self.sessions.close(req.session_id)
        if s is not None:
            async with s.lock:  # an in-flight Forward may still open the session on the next tier
                if s.next_open:
                    await self._close_next(s.id)
        return pb.CloseSessionReply(existed=s is not None)

    async def _close_next(self, sid: str) -> None:
        try:
            await self._stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            log.info("close of %s on %s failed: %s", sid, self.conf.next, e.code().name)

    def _evicted(self, s: Session) -> None:
        if s.next_open and self._stub is not None:
            t = asyncio.ensure_future(self._close_next(s.id))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)

    # ---- Forward -------------------------------------------------------------------------------
    def _validate(self, req) -> int:
        """Stateless checks; returns the deepest exit wanted."""
        if not req.session_id:
            raise Abort("INVALID_ARGUMENT", "session_id is empty")
        if req.pos < 0:
            raise Abort("INVALID_ARGUMENT", f"pos must be >= 0, got {req.pos}")
        kind = req.WhichOneof("input")
        want_kind = "tokens" if self.stage.has_embedding else "hidden"
        if kind != want_kind:
            raise Abort("INVALID_ARGUMENT", f"tier {self.tier} takes {want_kind} as input, got {kind or 'nothing'}")
        G = self.cfg.G
        wanted = req.max_exit if req.HasField("max_exit") else G - 1
        if not self.stage.exits[0] <= wanted < G:
            raise Abort("INVALID_ARGUMENT",
                        f"exit {wanted} out of range: this tier serves exits {self.stage.exits[0]}..{G - 1}")
        pol.validate(req.policy, req.sampling)
        return wanted

    def _decode_input(self, req, max_positions: int) -> torch.Tensor:
        if req.WhichOneof("input") == "tokens":
            ids = list(req.tokens.ids)
            if not ids:
                raise Abort("INVALID_ARGUMENT", "no token ids")
            if len(ids) > max_positions:
                raise Abort("RESOURCE_EXHAUSTED", f"{len(ids)} tokens exceed the session limit of {max_positions}")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise Abort("INVALID_ARGUMENT", f"token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})")
            return torch.tensor([ids], dtype=torch.long)  # (1, T)
        try:
            return codec.decode(req.hidden, d_model=self.cfg.d_model, out_dtype=self.dtype, max_positions=max_positions)
        except codec.CodecLimitError as e:
            raise Abort("RESOURCE_EXHAUSTED", str(e)) from None

    async def _forward(self, req, deadline: float):
        t0 = time.perf_counter()
        wanted = self._validate(req)
        s = self.sessions.get(req.session_id)
        async with s.lock:
            if s.closed:
                raise Abort("NOT_FOUND", f"session {s.id!r} was closed")
            if time.monotonic() >= deadline:  # queued behind a slow step and the caller is gone: skip it
                raise Abort("DEADLINE_EXCEEDED", "deadline passed while waiting for the session")
            x = self._decode_input(req, s.max_tokens)
            pos, T = int(req.pos), x.shape[1]
            if pos > s.length:
                raise Abort("FAILED_PRECONDITION", f"positions out of order: session holds {s.length}, request starts at {pos}")
            if pos + T > s.max_tokens:
                raise Abort("RESOURCE_EXHAUSTED", f"positions up to {pos + T} exceed the session limit of {s.max_tokens}")
            s.truncate(pos)  # no-op unless this is a replay / rewind
            need = [] if req.fill_only else self._exits_needed(req, wanted)
            logits = (await asyncio.to_thread(self._compute, s, x, pos, need) if self.conf.offload_compute
                      else self._compute(s, x, pos, need))
            if self.conf.inject_delay_ms > 0:
                await asyncio.sleep(self.conf.inject_delay_ms / 1000.0)
            try:
                self.sessions.enforce_bytes(s)
            except SessionError:
                s.truncate(pos)  # the step did not happen; the caller may retry at `pos`
                raise
            self.served += 1
            if req.fill_only:
                return pb.ForwardReply(request_id=req.request_id, token=-1, exit=-1, tier=self.tier, length=s.length,
                                       total_ms=_ms(t0), tiers=[pb.TierTiming(tier=self.tier, compute_ms=_ms(t0))])
            return await self._answer(s, req, wanted, logits, t0, deadline)

    def _exits_needed(self, req, wanted: int) -> list[int]:
        here = [g for g in self.stage.exits if g <= wanted]
        need = here if req.policy.kind != pb.ExitPolicy.FIXED else [g for g in here if g == wanted]
        if wanted > self.stage.deepest_exit:  # may have to answer degraded from our deepest exit
            need = sorted(set(need) | {self.stage.deepest_exit})
        return need

    def _compute(self, s: Session, x, pos: int, need: list[int]) -> dict[int, torch.Tensor]:
        """Run the stage on [pos, pos+T); logits (V,) at the last position for the exits in `need`.

        The stage runs every held exit's branch layers on the whole chunk (their KV must cover every
        position) and unembeds only `need` at the last position."""
        T = x.shape[1]
        try:
            out = self.stage.forward(x, pos, s.cache, logits_for=need, last_only=True)
            logits = {g: out.exit_logits[g][0, -1].float() for g in need}  # (V,)
        except CacheError as e:
            s.truncate(pos)
            raise Abort("FAILED_PRECONDITION", str(e)) from None
        except BaseException:
            s.truncate(pos)
            raise
        if s.log is not None:
            s.log.write(out.h_out_BTD.detach(), pos)
        s.length = pos + T
        return logits

    async def _answer(self, s: Session, req, wanted: int, logits: dict, t0: float, deadline: float):
        confs = []
        for g in (g for g in self.stage.exits if g <= wanted):
            if req.policy.kind == pb.ExitPolicy.FIXED and g != wanted:
                continue
            stats = pol.confidence(logits[g])
            confs.append(pb.ExitConfidence(exit=g, max_prob=stats[0], entropy=stats[1], margin=stats[2]))
            if g == wanted or pol.passes(req.policy, stats):
                return self._reply(req, g, logits[g], s.length, confs, t0)
        rep, reason = await self._relay(s, req, deadline)
        if rep is None:  # degraded: our deepest exit
            g = self.stage.deepest_exit
            if not confs or confs[-1].exit != g:
                stats = pol.confidence(logits[g])
                confs.append(pb.ExitConfidence(exit=g, max_prob=stats[0], entropy=stats[1], margin=stats[2]))
            r = self._reply(req, g, logits[g], s.length, confs, t0)
            r.degraded, r.reason = True, reason
            log.warning("session %s pos %d degraded at %s: %s", s.id, s.length, self.tier, reason)
            return r
        out, rtt_ms, total = pb.ForwardReply(), rep[1], _ms(t0)
        out.CopyFrom(rep[0])
        del out.confidence[:], out.tiers[:], out.hops[:]
        out.confidence.extend(confs + list(rep[0].confidence))
        out.tiers.extend([pb.TierTiming(tier=self.tier, compute_ms=total - rtt_ms)] + list(rep[0].tiers))
        nxt = rep[0].tiers[0].tier if rep[0].tiers else "next"
        out.hops.extend([pb.HopTiming(src=self.tier, dst=nxt, net_ms=max(0.0, rtt_ms - rep[0].total_ms))]
                        + list(rep[0].hops))
        out.length, out.total_ms = s.length, total
        return out

    def _reply(self, req, g: int, logits_V, length: int, confs, t0: float):
        token = pol.sample(logits_V, req.sampling, length - 1)
        ms = _ms(t0)
        return pb.ForwardReply(request_id=req.request_id, token=token, exit=g, tier=self.tier, confidence=confs,
                               length=length, total_ms=ms, tiers=[pb.TierTiming(tier=self.tier, compute_ms=ms)])

    # ---- relay to the next tier ----------------------------------------------------------------
    async def _relay(self, s: Session, req, deadline: float):
        """((reply, round-trip ms), "") from the next tier, or (None, reason) to answer degraded."""
        if self._stub is None:
            return None, "no next tier configured"
        for attempt in range(2):
            try:
                t = time.perf_counter()
                if not s.next_open:
                    await self._open_next(s, deadline)
                rep = await self._send_pending(s, req, deadline)
                return (rep, _ms(t)), ""
            except _NoTime as e:
                return None, str(e)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) and attempt == 0:
                    s.next_open, s.acked = False, 0  # it lost the session (or has a gap): resend from 0
                    continue
                return None, f"next tier {self.conf.next} {code.name}: {e.details()}"
        return None, "next tier lost the session twice"

    def _timeout(self, deadline: float) -> float:
        left = deadline - time.monotonic() - self.conf.deadline_margin_ms / 1000.0
        if left <= 0:
            raise _NoTime("deadline: no time left for the next tier")
        return left

    async def _open_next(self, s: Session, deadline: float) -> None:
        try:
            await self._stub.OpenSession(pb.OpenSessionRequest(session_id=s.id, max_tokens=s.max_tokens),
                                         timeout=self._timeout(deadline))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # a stale copy is fine: we resend from 0
                raise
        s.next_open, s.acked = True, 0

    async def _send_pending(self, s: Session, req, deadline: float):
        start, stop = s.acked, s.length
        per = max(1, (self.conf.max_message_bytes - (64 << 10)) // codec.bytes_per_position(self.cfg.d_model, self.wire))
        rep = None
        for c0 in range(start, stop, per):
            c1 = min(c0 + per, stop)
            msg = pb.ForwardRequest(session_id=s.id, request_id=req.request_id, pos=c0,
                                    hidden=codec.encode(s.log.read(c0, c1), self.wire),
                                    pending=max(0, min(c1, req.pos) - c0), policy=req.policy,
                                    sampling=req.sampling, fill_only=c1 < stop)
            if req.HasField("max_exit"):
                msg.max_exit = req.max_exit
            rep = await self._stub.Forward(msg, timeout=self._timeout(deadline))
            s.acked = c1
        return rep

    # ---- introspection -------------------------------------------------------------------------
    def _stats(self):
        now, L = time.monotonic(), self.conf.limits
        infos = [pb.SessionInfo(session_id=s.id, length=s.length, kv_bytes=s.kv_bytes(), log_bytes=s.log_bytes(),
                                acked=s.acked, idle_s=now - s.last_used) for s in self.sessions.sessions.values()]
        return pb.StatsReply(tier=self.tier, exits=self.stage.exits, start_layer=self.stage.start_layer,
                             stop_layer=self.stage.stop_layer, sessions=infos, total_bytes=self.sessions.total_bytes(),
                             max_sessions=L.max_sessions, max_tokens=self.sessions.max_tokens,
                             max_total_bytes=L.max_total_bytes, evicted=self.sessions.evicted, served=self.served,
                             next=self.conf.next or "")

    def tier_info(self) -> "pb.TierInfo":
        vl = exit_val_losses(self.stage)
        return pb.TierInfo(tier=self.tier, start_layer=self.stage.start_layer, stop_layer=self.stage.stop_layer,
                           onnx=self.conf.onnx, wire_dtype=self.wire,
                           exits=[pb.ExitInfo(index=g, layer=self.cfg.exits[g],
                                              val_loss=math.nan if vl.get(g) is None else float(vl[g]))
                                  for g in self.stage.exits])

    async def _family_info(self):
        out = pb.FamilyInfoReply(tiers=[self.tier_info()], n_exits=self.cfg.G, complete=self.stage.is_last)
        if self._stub is not None:
            try:
                rest = await self._stub.FamilyInfo(pb.FamilyInfoRequest(), timeout=5.0)
                if rest.tiers:
                    rest.tiers[0].address = self.conf.next
                out.tiers.extend(rest.tiers)
                out.complete = rest.complete
            except grpc.aio.AioRpcError as e:
                log.info("FamilyInfo: next tier %s: %s", self.conf.next, e.code().name)
        return out

    async def sweep_forever(self) -> None:
        period = max(0.05, min(5.0, self.conf.limits.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            self.sessions.sweep_idle()

    async def close(self) -> None:
        for t in list(self._bg):
            t.cancel()
        if self._channel is not None:
            await self._channel.close()


class _NoTime(Exception):
    pass


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


# ---- server --------------------------------------------------------------------------------------
@dataclass
class NodeHandle:
    server: grpc.aio.Server
    node: RelayNode
    port: int
    sweeper: asyncio.Task

    async def stop(self, grace: float | None = None) -> None:
        self.sweeper.cancel()
        await self.server.stop(grace)
        await self.node.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


class _Undecodable:
    """A request whose bytes are not the expected protobuf (answered INVALID_ARGUMENT, not UNKNOWN)."""

    def __init__(self, what: str, err: Exception):
        self.msg = f"request is not a valid {what}: {err}"


def _add_relay_service(node: RelayNode, server) -> None:
    """Like the generated add_RelayServicer_to_server, but bytes that fail to parse reach the handler
    as `_Undecodable` so the caller gets INVALID_ARGUMENT with a message instead of gRPC's UNKNOWN."""
    from google.protobuf.message import DecodeError

    def tolerant(cls):
        def parse(data: bytes):
            try:
                return cls.FromString(data)
            except DecodeError as e:
                return _Undecodable(cls.DESCRIPTOR.full_name, e)
        return parse

    def checked(fn):
        async def handle(req, ctx):
            if isinstance(req, _Undecodable):
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"[{node.tier}] {req.msg}")
            return await fn(req, ctx)
        return handle

    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["Relay"].methods:
        req_cls, rep_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            checked(getattr(node, m.name)), request_deserializer=tolerant(req_cls),
            response_serializer=rep_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


async def serve(stage, config: NodeConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                tls: TLSConfig | None = None, require_client_cert: bool = False) -> NodeHandle:
    """Start a node on host:port (0 = any free port) and return once it is serving."""
    node = RelayNode(stage, config)
    mb = node.conf.max_message_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", mb),
                                      ("grpc.max_send_message_length", mb),
                                      ("grpc.so_reuseport", 0)])
    _add_relay_service(node, server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    addr = f"{host}:{port}"
    bound = (server.add_secure_port(addr, tls.server_credentials(require_client_cert)) if tls is not None
             else server.add_insecure_port(addr))
    if bound == 0:
        raise OSError(f"could not bind {addr}")
    await server.start()
    for svc in ("", SERVICE_NAME):
        await hs.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return NodeHandle(server, node, bound, asyncio.ensure_future(node.sweep_forever()))
