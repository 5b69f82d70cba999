"""A relay tier node: a grpc.aio servicer in front of one tier engine (relay/tier.py).

RPCs (relay/protos/familial/relay/v1/relay.proto):
- `Generate` (head): one bidirectional stream per router carries many requests; token events of one
  engine step leave as one message per stream.
- `Step` / `Release` / `Sync` (tier to tier): the upstream's batched steps, finished sequences, and its
  live set (sequences it created here and no longer knows, e.g. after it restarted, are released).
- `OpenSession` / `Forward` / `CloseSession`: one sequence step by step; the reply of OpenSession holds
  an unguessable capability that Forward and CloseSession must present.
- `Stats` (session ids only with the admin or node token), `FamilyInfo`, and the gRPC health service.
Tier-to-tier calls need the node token when one is set (`--node-token`, sent as metadata); mTLS can
pin the upstream's identity too. Errors map to status codes with a message; nothing a client sends
crashes the node. Nothing here schedules or computes: the engine does; nothing here knows HTTP.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from relay import codec, wire
from relay.client import DEFAULT_MAX_MESSAGE_BYTES, make_channel
from relay.codec import CodecError
from relay.pb import SERVICE_NAME, pb, pb_grpc
from relay.tier import TierConfig, TierEngine
from relay.types import TLSConfig
from relay.work import INF, EngineError, Item, StepMessage, StepReply, TokenEvent
from trunk.kv_pool import KVPool, plan_slots
from trunk.sampling import SamplingError

log = logging.getLogger("familial.relay")
INLINE_ENCODE_BYTES = 256 << 10  # step messages up to this many hidden-state bytes are encoded on the loop

TOKEN_HEADER = "x-familial-node-token"
ADMIN_HEADER = "x-familial-admin-token"
SYNC_PERIOD_S = 0.5     # an upstream tells its live set this often
SYNC_STALE_S = 1.5      # sequences of an upstream silent this long (and idle) are orphans


@dataclass
class NodeConfig:
    next: str | None = None                 # HOST:PORT of the next (deeper) tier
    next_tls: TLSConfig | None = None       # client credentials for dialing `next`
    engine: TierConfig = field(default_factory=TierConfig)
    kv_memory_mb: float | None = None       # KV pool budget; None: kv_memory_fraction of free memory
    kv_memory_fraction: float = 0.5
    max_model_len: int | None = None        # positions per sequence (default: the model's max_seq_len)
    max_slots: int | None = None            # pool slots at most (sequences resident at once); None: 256 on CUDA, 64 on CPU
    wire_dtype: str = "auto"                # hidden states to the next tier: auto (= compute dtype, lossless) | float32 | float16 | bfloat16 | int8
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    node_token: str | None = None           # required from upstream tiers (Step/Release/Sync) and sent to --next
    admin_token: str | None = None          # Stats lists session ids only for callers presenting it (or the node token)
    inject_delay_ms: float = 0.0            # TEST ONLY: added to every engine step here
    onnx: bool = False                      # the stage runs on ONNX Runtime (reported in FamilyInfo)
    cuda_graphs: bool = True                # CUDA: capture decode steps as graphs at start-up
    step_stream: bool = True                # steps to the next tier over one StepStream (False: a unary Step each)


class GrpcDownstream:
    """The next tier over gRPC: encodes step messages, maps replies back, keeps the orphan sync going."""

    def __init__(self, target: str, tls: TLSConfig | None, conf: NodeConfig, d_model: int, dtype, G: int,
                 wire_dtype: str, node_id: str):
        self.target, self.tier, self.conf = target, target, conf
        self.d_model, self.dtype, self.G, self.wire, self.node_id = d_model, dtype, G, wire_dtype, node_id
        self.channel = make_channel(target, tls, conf.max_message_bytes)
        self.stub = pb_grpc.RelayStub(self.channel)
        self.metadata = ((TOKEN_HEADER, conf.node_token),) if conf.node_token else None
        self._unary = not conf.step_stream
        self._call = self._reader = None
        self._next_id = 0
        self._waiting: dict[int, tuple[object, asyncio.Future]] = {}
        self._write_lock = asyncio.Lock()

    async def step(self, msg: StepMessage, timeout: float) -> StepReply:
        t0 = time.perf_counter()
        if msg.hidden.numel() * msg.hidden.element_size() > INLINE_ENCODE_BYTES:
            req = await asyncio.to_thread(wire.step_to_pb, msg, self.wire)  # big device -> host copy off the loop
        else:
            req = wire.step_to_pb(msg, self.wire)
        req.src = self.node_id  # as in Sync: the next tier keys sequences by node, and heads share a tier name
        local_ms = (time.perf_counter() - t0) * 1e3
        timeout = max(0.001, timeout)
        if self._unary:
            rep = await self.stub.Step(req, timeout=timeout, metadata=self.metadata)
        else:
            try:
                rep = await self._stream_step(req, timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._unary = True  # a peer without StepStream: unary Step from now on
                rep = await self.stub.Step(req, timeout=timeout, metadata=self.metadata)
        out = wire.reply_from_pb(rep, len(msg.seqs))
        out.local_ms = local_ms
        self.tier = out.tier or self.tier
        return out

    async def _stream_step(self, req, timeout: float):
        """One step over the long-lived StepStream (opened on first use and after it broke): the
        request goes out under a fresh call_id, the reader task hands back the reply with that id."""
        if self._call is None:
            self._call = call = self.stub.StepStream(metadata=self.metadata)
            self._reader = asyncio.ensure_future(self._read(call))
        call = self._call
        self._next_id += 1
        req.call_id = cid = self._next_id
        fut = asyncio.get_running_loop().create_future()
        self._waiting[cid] = (call, fut)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: no task per write, the write starts now
                async with self._write_lock:
                    await call.write(req)
                rep = await fut
        except (asyncio.CancelledError, TimeoutError):
            raise
        except Exception:
            if self._call is call:  # a write on a broken stream: the next step opens a new one
                self._call = None
            raise
        finally:
            self._waiting.pop(cid, None)
        if rep.error_code:
            raise StepCallError(rep.error_code, rep.error)
        return rep

    async def _read(self, call) -> None:
        err: BaseException = ConnectionError(f"StepStream to {self.target} ended")
        try:
            async for rep in call:
                entry = self._waiting.get(rep.call_id)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(rep)
        except asyncio.CancelledError:
            err = ConnectionError(f"StepStream to {self.target} closed")
        except Exception as e:  # noqa: BLE001 - UNAVAILABLE, CANCELLED, ...: every waiting step gets it
            err = e
        if self._call is call:
            self._call = None
        for c, fut in list(self._waiting.values()):
            if c is call and not fut.done():
                fut.set_exception(err)

    async def release(self, seq_ids: list[str]) -> None:
        await self.stub.Release(pb.ReleaseRequest(seq_ids=seq_ids), timeout=5.0, metadata=self.metadata)

    async def sync(self, live: list[str]) -> None:
        await self.stub.Sync(pb.SyncRequest(src=self.node_id, live=live), timeout=5.0, metadata=self.metadata)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._call is not None:
            self._call.cancel()
        await self.channel.close()


class StepCallError(Exception):
    """A step answered over StepStream with the status a unary Step would have ended with."""

    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self._code = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
        self._msg = msg

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._msg


class Abort(Exception):
    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code = code


class RelayNode(pb_grpc.RelayServicer):
    def __init__(self, stage, config: NodeConfig | None = None, *, device=None):
        self.stage, self.conf = stage, config or NodeConfig()
        self.cfg, self.tier = stage.cfg, stage.tier
        self.t_start = time.monotonic()
        self.dtype = stage.dtype
        self.wire = codec.wire_dtype_name(self.dtype) if self.conf.wire_dtype == "auto" else self.conf.wire_dtype
        if self.wire not in codec.WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {self.wire!r}")
        self.node_id = f"{self.tier}-{uuid.uuid4().hex[:12]}"
        self.pool = make_pool(stage, self.conf, device)
        self.down = None
        if self.conf.next:
            self.down = GrpcDownstream(self.conf.next, self.conf.next_tls, self.conf, self.cfg.d_model, self.dtype,
                                       self.cfg.G, self.wire, self.node_id)
        ec = self.conf.engine
        ec.max_message_bytes = self.conf.max_message_bytes
        ec.step_delay_ms = self.conf.inject_delay_ms
        self.engine = TierEngine(stage, self.pool, self.tier, self.down, ec)
        self._synced: dict[str, float] = {}     # upstream node id -> last Step or Sync
        self._bg: list[asyncio.Task] = []
        self._sync: asyncio.Task | None = None  # our Sync to the next tier in flight

    def start(self) -> None:
        if self.conf.cuda_graphs:
            self.engine.capture_graphs()
        self.engine.start()
        self._bg.append(asyncio.ensure_future(self._housekeeping()))

    # ---- errors and auth -----------------------------------------------------------------------
    async def _guard(self, ctx, coro):
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status; bugs are logged there
            code, msg = self._status(e)
        await ctx.abort(grpc.StatusCode[code], msg)

    def _status(self, e: Exception) -> tuple[str, str]:
        """The gRPC status name and message a failed call answers with."""
        if isinstance(e, (Abort, EngineError)):
            code, msg = e.code, str(e)
        elif isinstance(e, (CodecError, SamplingError)):
            code, msg = "INVALID_ARGUMENT", str(e)
        else:  # a bug, not the caller's fault: say so, keep serving
            log.exception("internal error", exc_info=e)
            code, msg = "INTERNAL", f"{type(e).__name__}: {e}"
        return code, f"[{self.tier}] {msg}"

    def _has(self, ctx, header: str, token: str | None) -> bool:
        if not token:
            return False
        got = dict(ctx.invocation_metadata() or ()).get(header, "")
        return hmac.compare_digest(got.encode(), token.encode())

    def _need_node(self, ctx) -> None:
        if self.conf.node_token and not self._has(ctx, TOKEN_HEADER, self.conf.node_token):
            raise Abort("PERMISSION_DENIED", "tier-to-tier call without the node token")

    def _admin(self, ctx) -> bool:
        no_tokens = not self.conf.admin_token and not self.conf.node_token
        return no_tokens or self._has(ctx, ADMIN_HEADER, self.conf.admin_token) or \
            self._has(ctx, TOKEN_HEADER, self.conf.node_token)

    # ---- Generate (head) -----------------------------------------------------------------------
    async def Generate(self, request_iterator, ctx):
        if not self.stage.has_embedding:
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, f"[{self.tier}] Generate goes to the head tier")
        out: asyncio.Queue = asyncio.Queue()
        pending: list = []
        live: set[str] = set()
        state = {"eof": False}

        def flush():
            batch = pending[:]
            pending.clear()
            if batch:
                out.put_nowait(batch)

        def emitter(rid: str):
            def emit(ev):
                if not pending:  # written once this step's work went deeper (TierEngine.after_step)
                    self.engine.after_step(flush)
                pending.append(wire.event_to_pb(rid, ev))
                if ev.finish_reason:
                    live.discard(rid)
                    if state["eof"] and not live:
                        self.engine.after_step(lambda: out.put_nowait(None))
            return emit

        async def read():
            try:
                async for call in request_iterator:
                    self._call(call, live, emitter)
            finally:
                state["eof"] = True
                if not live:
                    out.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                batch = await out.get()
                if batch is None:
                    break
                yield pb.TokenEvents(events=batch)
        finally:
            reader.cancel()
            for rid in list(live):  # the router went away: free its requests everywhere
                self.engine.abort(rid)

    def _call(self, call, live: set[str], emitter) -> None:
        kind = call.WhichOneof("call")
        if kind == "submit":
            rid = call.submit.request_id
            try:
                req = wire.gen_from_pb(call.submit, time.monotonic())
                if rid in live:
                    raise EngineError("ALREADY_EXISTS", f"request {rid!r} is already running on this stream")
                live.add(rid)
                self.engine.generate(req, emitter(rid))
            except (EngineError, CodecError, SamplingError) as e:
                live.discard(rid)
                code = getattr(e, "code", "INVALID_ARGUMENT")
                emitter(rid)(TokenEvent(-1, -1, self.tier, 0, finish_reason="error", error=f"{code}: {e}"))
        elif kind == "update" and call.update.request_id in live:
            try:
                self.engine.update(call.update.request_id, call.update.exit if call.update.HasField("exit") else None)
            except EngineError as e:
                log.info("update refused: %s", e)
        elif kind == "abort" and call.abort.request_id in live:
            self.engine.abort(call.abort.request_id)

    # ---- tier to tier --------------------------------------------------------------------------
    async def Step(self, req, ctx):
        return await self._guard(ctx, self._step(req, ctx))

    async def _step(self, req, ctx):
        fut = asyncio.get_running_loop().create_future()
        self._start_step(req, ctx, lambda reply: fut.done() or fut.set_result(reply))
        return wire.reply_to_pb(await fut)

    def _start_step(self, req, ctx, done: Callable[[StepReply], None]) -> None:
        """Decode an upstream's step and hand it to the engine; `done` gets the engine's reply once every
        sequence has its result (called from the engine's loop). Raises what the step is refused with."""
        self._need_node(ctx)
        if self.stage.has_embedding:
            raise Abort("FAILED_PRECONDITION", f"tier {self.tier} takes token ids; Step goes to deeper tiers")
        msg = wire.step_from_pb(req, self.cfg.d_model, self.dtype, self.pool.shape.max_len * 4096, self.cfg.G)
        if msg.src:  # any message from an upstream says it is alive
            self._synced[msg.src] = time.monotonic()
        self.engine.submit_step(msg, done)

    async def StepStream(self, request_iterator, ctx):
        """Step over one long-lived stream: each request goes to the engine as it arrives (concurrently,
        as unary Steps do; no task per step) and is answered when done, with its call_id; a failed step
        answers with error_code/error and the stream stays open. Ends when the upstream stops writing
        and every step it sent is answered."""
        try:
            self._need_node(ctx)
        except Abort as e:
            await ctx.abort(grpc.StatusCode[e.code], f"[{self.tier}] {e}")
        replies: asyncio.Queue = asyncio.Queue()
        state = {"open": 0, "eof": False}  # steps not yet answered; the upstream stopped writing

        def answer(call_id: int, reply: StepReply | None, err: Exception | None = None) -> None:
            try:
                rep = wire.reply_to_pb(reply) if err is None else None
            except Exception as e:  # noqa: BLE001 - a bug: answered as INTERNAL, the engine's loop goes on
                err = e
            if err is not None:
                code, msg = self._status(err)
                rep = pb.StepReply(tier=self.tier, error_code=code, error=msg)
            rep.call_id = call_id
            replies.put_nowait(rep)
            state["open"] -= 1
            if state["eof"] and state["open"] == 0:
                replies.put_nowait(None)

        def start(req) -> None:
            state["open"] += 1
            try:
                self._start_step(req, ctx, lambda reply, cid=req.call_id: answer(cid, reply))
            except Exception as e:  # noqa: BLE001 - answered, not raised: the stream carries other steps
                answer(req.call_id, None, e)

        async def pump():
            try:
                async for req in request_iterator:
                    start(req)
            except BaseException:
                replies.put_nowait(None)  # the stream broke: nobody reads what is still running
                raise
            state["eof"] = True
            if state["open"] == 0:
                replies.put_nowait(None)

        reader = asyncio.ensure_future(pump())
        try:
            while (rep := await replies.get()) is not None:
                yield rep
        finally:
            reader.cancel()

    async def Release(self, req, ctx):
        async def go():
            self._need_node(ctx)
            return pb.ReleaseReply(released=sum(self.engine.close(s) for s in req.seq_ids))
        return await self._guard(ctx, go())

    async def Sync(self, req, ctx):
        async def go():
            self._need_node(ctx)
            self._synced[req.src] = time.monotonic()
            return pb.SyncReply(released=self.engine.release_from(req.src, set(req.live), idle_s=SYNC_STALE_S))
        return await self._guard(ctx, go())

    # ---- sessions ------------------------------------------------------------------------------
    async def OpenSession(self, req, ctx):
        async def go():
            if len(req.session_id) > 256:
                raise Abort("INVALID_ARGUMENT", "session_id longer than 256 characters")
            if req.max_tokens < 0:
                raise Abort("INVALID_ARGUMENT", f"max_tokens must be >= 0, got {req.max_tokens}")
            cap = secrets.token_urlsafe(24)
            s = self.engine.open(req.session_id or uuid.uuid4().hex, owner=cap, max_tokens=int(req.max_tokens))
            return pb.OpenSessionReply(session_id=s.id, max_tokens=s.max_tokens, capability=cap)
        return await self._guard(ctx, go())

    async def CloseSession(self, req, ctx):
        async def go():
            s = self.engine.seqs.get(req.session_id)
            if s is None:
                return pb.CloseSessionReply(existed=False)
            self.engine.get(req.session_id, owner=req.capability)
            return pb.CloseSessionReply(existed=self.engine.close(req.session_id))
        return await self._guard(ctx, go())

    async def Forward(self, req, ctx):
        return await self._guard(ctx, self._forward(req, ctx))

    async def _forward(self, req, ctx):
        t0 = time.perf_counter()
        if not req.session_id:
            raise Abort("INVALID_ARGUMENT", "session_id is empty")
        if req.pos < 0:
            raise Abort("INVALID_ARGUMENT", f"pos must be >= 0, got {req.pos}")
        s = self.engine.get(req.session_id, owner=req.capability)
        want = req.max_exit if req.HasField("max_exit") else self.cfg.G - 1
        if not self.stage.exits[0] <= want < self.cfg.G:
            raise Abort("INVALID_ARGUMENT",
                        f"exit {want} out of range: this tier serves exits {self.stage.exits[0]}..{self.cfg.G - 1}")
        x = self._input(req, s.max_tokens)
        remaining = ctx.time_remaining()
        deadline = time.monotonic() + (self.conf.engine.step_timeout_s if remaining is None else remaining)
        item = Item(s.id, int(req.pos), x, None if req.fill_only else want, wire.policy_from_pb(req.policy),
                    wire.sampling_from_pb(req.sampling), req.fill_only, deadline)
        res = await self.engine.forward(item)
        if not res.ok:
            raise Abort(*res.error)
        tiers, hops = wire.timings_to_pb(res.timings)
        return pb.ForwardReply(request_id=req.request_id, token=res.token if not req.fill_only else -1,
                               exit=res.exit if not req.fill_only else -1, tier=res.tier or self.tier,
                               confidence=wire.confidence_to_pb(res.confidence), degraded=res.degraded,
                               reason=res.reason, tiers=tiers, hops=hops, length=s.length,
                               total_ms=(time.perf_counter() - t0) * 1e3)

    def _input(self, req, max_positions: int) -> torch.Tensor:
        kind = req.WhichOneof("input")
        want = "tokens" if self.stage.has_embedding else "hidden"
        if kind != want:
            raise Abort("INVALID_ARGUMENT", f"tier {self.tier} takes {want} as input, got {kind or 'nothing'}")
        if kind == "tokens":
            ids = list(req.tokens.ids)
            if not ids:
                raise Abort("INVALID_ARGUMENT", "no token ids")
            if len(ids) > max_positions:
                raise Abort("RESOURCE_EXHAUSTED", f"{len(ids)} tokens exceed the session limit of {max_positions}")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise Abort("INVALID_ARGUMENT", f"token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})")
            return torch.tensor(ids, dtype=torch.long)
        try:
            return codec.decode(req.hidden, d_model=self.cfg.d_model, out_dtype=self.dtype,
                                max_positions=max_positions)[0]
        except codec.CodecLimitError as e:
            raise Abort("RESOURCE_EXHAUSTED", str(e)) from None

    # ---- introspection -------------------------------------------------------------------------
    async def Stats(self, req, ctx):
        st = self.engine.stats()
        infos = []
        if self._admin(ctx):
            infos = [pb.SessionInfo(session_id=k, length=v["length"], kv_bytes=v["kv_bytes"], acked=v["acked"],
                                    idle_s=v["idle_s"]) for k, v in st["seqs"].items()]
        p = st["pool"]
        return pb.StatsReply(tier=self.tier, exits=self.stage.exits, start_layer=self.stage.start_layer,
                             stop_layer=self.stage.stop_layer, sessions=infos, total_bytes=p["bytes"],
                             max_sessions=self.conf.engine.max_sessions, max_tokens=p["max_len"],
                             max_total_bytes=p["bytes"], evicted=st["evicted"], served=st["items"],
                             next=self.conf.next or "", live_sessions=st["sequences"], pool_slots=p["slots"],
                             pool_free_slots=p["free_slots"], pool_bytes_per_token=p["bytes_per_token"],
                             pool_max_len=p["max_len"], steps=st["steps"], rows=st["rows"],
                             degraded=st["degraded"], replays=st["replays"], running=st["running"],
                             stage_s=st["stage_s"], cpu_s=time.process_time(), uptime_s=time.monotonic() - self.t_start)

    def tier_info(self) -> "pb.TierInfo":
        vl = getattr(self.stage, "val_loss", {}) or {}
        return pb.TierInfo(tier=self.tier, start_layer=self.stage.start_layer, stop_layer=self.stage.stop_layer,
                           onnx=self.conf.onnx, wire_dtype=self.wire,
                           exits=[pb.ExitInfo(index=g, layer=self.cfg.exits[g],
                                              val_loss=math.nan if vl.get(g) is None else float(vl[g]))
                                  for g in self.stage.exits])

    async def FamilyInfo(self, req, ctx):
        out = pb.FamilyInfoReply(tiers=[self.tier_info()], n_exits=self.cfg.G, complete=self.stage.is_last)
        if self.down is not None:
            try:
                rest = await self.down.stub.FamilyInfo(pb.FamilyInfoRequest(), timeout=5.0)
                if rest.tiers:
                    rest.tiers[0].address = self.conf.next
                out.tiers.extend(rest.tiers)
                out.complete = rest.complete
            except grpc.aio.AioRpcError as e:
                log.info("FamilyInfo: next tier %s: %s", self.conf.next, e.code().name)
        return out

    # ---- housekeeping --------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Idle sessions out, orphans of silent upstreams out, our live set to the next tier."""
        tick = time.monotonic()
        while True:
            await asyncio.sleep(SYNC_PERIOD_S)
            try:
                self.engine.sweep_idle()
                now = time.monotonic()
                late, tick = now - tick > 2 * SYNC_PERIOD_S, now
                for src, t in list(self._synced.items()):
                    if late:  # this loop was stalled: Syncs may sit unread behind it, so silence proves nothing
                        self._synced[src] = max(t, now - SYNC_PERIOD_S)
                    elif now - t > SYNC_STALE_S:
                        self.engine.release_from(src, idle_s=SYNC_STALE_S)
                        if not any(s.src == src for s in self.engine.seqs.values()):
                            del self._synced[src]
                if self.down is not None and (self._sync is None or self._sync.done()):
                    # not awaited: a hung next tier would hold this loop for the call's timeout, and
                    # the stall would read as `late` period after period, keeping every orphan here
                    self._sync = asyncio.ensure_future(self._sync_down())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep housekeeping going; try again next period
                log.debug("housekeeping: %s", e)

    async def _sync_down(self) -> None:
        try:
            await self.down.sync([s.id for s in self.engine.seqs.values() if s.epoch > 0])
        except Exception as e:  # noqa: BLE001 - the next tier may be down; try again next period
            log.debug("sync to %s: %s", self.conf.next, e)

    async def close(self) -> None:
        tasks = [*self._bg, *([self._sync] if self._sync else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.engine.stop()
        if self.down is not None:
            await self.down.close()


def make_pool(stage, conf: NodeConfig, device=None) -> KVPool:
    """The tier's KV pool, sized from the byte budget (or the free-memory fraction)."""
    shape = stage.pool_shape(conf.max_model_len)
    dev = device if device is not None else stage.device
    budget = None if conf.kv_memory_mb is None else int(conf.kv_memory_mb * 2**20)
    cap = conf.max_slots or (256 if torch.device(dev).type == "cuda" else 64)
    n = plan_slots(shape, dev, memory_bytes=budget, memory_fraction=conf.kv_memory_fraction, max_slots=cap)
    return KVPool(shape, n, dev, scratch=torch.device(dev).type == "cuda")


# ---- server --------------------------------------------------------------------------------------
@dataclass
class NodeHandle:
    server: grpc.aio.Server
    node: RelayNode
    port: int

    async def stop(self, grace: float | None = None) -> None:
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
        if m.client_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                getattr(node, m.name), request_deserializer=req_cls.FromString,
                response_serializer=rep_cls.SerializeToString)
            continue
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            checked(getattr(node, m.name)), request_deserializer=tolerant(req_cls),
            response_serializer=rep_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


async def serve(stage, config: NodeConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                tls: TLSConfig | None = None, require_client_cert: bool = False, device=None) -> NodeHandle:
    """Start a node on host:port (0 = any free port) and return once it is serving."""
    node = RelayNode(stage, config, device=device)
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
    node.start()
    await server.start()
    for svc in ("", SERVICE_NAME):
        await hs.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return NodeHandle(server, node, bound)


__all__ = ["NodeConfig", "RelayNode", "NodeHandle", "serve", "make_pool", "INF"]
