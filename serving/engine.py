"""The engine interface the HTTP handlers depend on, and its two implementations.

`Engine` (a typing.Protocol) is all the handlers see: `generate(request)` yields one `TokenOutput` per
completion token, `abort(request_id)` stops a request and frees its KV everywhere, `check_health()`.
Both engines share one generation loop (`SteppedEngine.generate`): open a session, send the prompt
(T > 1) and then one token per step, choosing the exit of each step with `exit_policy.ExitPlanner`
and feeding the planner the per-tier timings each step reports.

- `LocalEngine` runs `trunk.FamilyModel` in this process (one worker thread), tier by tier, with the
  same pending-position rule as the relay nodes, so it is a real single-process server.
- `RelayEngine` drives a chain of relay nodes through the head node with `relay.client.RelayClient`.

The engines know nothing of HTTP, chat templates or detokenisation: token ids in, token ids out.
Legend: B batch (always 1 here), T positions, D d_model, V vocab.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from serving.exit_policy import ExitInfo, ExitPlanner, Plan, work_for_step

DEFAULT_TIERS = ("device", "edge", "cloud")


class EngineError(RuntimeError):
    """The engine cannot serve the request at all (e.g. the head tier is unreachable)."""


# ---- what crosses the interface -------------------------------------------------------------------

@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    exit: int | None = None          # fixed exit index; None = choose by budget
    budget_ms: float | None = None   # whole request, from `arrival_s`
    ignore_eos: bool = False         # generate max_tokens whatever the model says (benchmarks, tests)
    arrival_s: float = field(default_factory=time.perf_counter)


@dataclass
class Replan:
    at_token: int
    from_exit: int
    to_exit: int
    reason: str


@dataclass
class TokenOutput:
    token_id: int
    exit: int
    tier: str
    latency_ms: dict[str, float]        # this step: per tier compute, "network"
    degraded: bool = False
    reason: str = ""
    replan: Replan | None = None        # set on the first token made after a step-down
    infeasible: bool = False            # set on the first token when no exit fitted the budget
    predicted_ms: float | None = None   # first token only: the plan's predicted request time
    decision_us: float = 0.0            # router time spent choosing this step's exit
    finish_reason: str | None = None    # "stop" (end of sequence) | "length" (max_tokens)


@dataclass
class FamilyInfo:
    name: str
    exits: list[ExitInfo]
    tiers: list[str]              # chain order, head first
    max_seq_len: int


class Tokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class Engine(Protocol):
    info: FamilyInfo
    tokenizer: Tokenizer
    planner: ExitPlanner

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> dict[str, bool]: ...


@dataclass
class StepResult:
    token: int
    exit: int
    tier: str
    degraded: bool = False
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)   # ms: tier names and "net:a->b"


# ---- the shared generation loop -------------------------------------------------------------------

class SteppedEngine:
    """Generation loop + exit planning over three primitives: `_open`, `_step`, `_close`."""

    info: FamilyInfo
    tokenizer: Tokenizer
    planner: ExitPlanner

    def __init__(self):
        self._live: dict[str, object] = {}      # request id -> session
        self._aborted: set[str] = set()
        self._started = False
        self._start_lock = asyncio.Lock()

    async def _open(self, max_tokens: int): ...

    async def _step(self, session, ids: list[int], pos: int, exit: int, sampling: SamplingParams) -> StepResult: ...

    async def _close(self, session) -> None: ...

    async def _setup(self) -> None:
        """Learn the family (exits, tiers); called once before calibration."""

    # ---- life cycle ----------------------------------------------------------------------------
    async def start(self, calibrate_rounds: int = 3) -> None:
        async with self._start_lock:
            if self._started:
                return
            await self._setup()
            self.planner = ExitPlanner(self.info.exits, self.info.tiers)
            await self.calibrate(calibrate_rounds)
            self._started = True

    async def calibrate(self, rounds: int = 3, prompt_len: int = 8, decode_steps: int = 3) -> None:
        """A few warm-up forwards per exit; the first round only warms caches and is not recorded."""
        rng = random.Random(7)
        vocab = getattr(self.tokenizer, "vocab_size", 256)
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        for r in range(rounds + 1):
            for e in self.info.exits:
                session = await self._open(prompt_len + decode_steps + 1)
                try:
                    seen: dict[str, int] = {}
                    ids, pos = prompt, 0
                    for _ in range(decode_steps + 1):
                        t0 = time.perf_counter()
                        res = await self._step(session, ids, pos, e.index, SamplingParams(temperature=0.0))
                        wall = (time.perf_counter() - t0) * 1e3
                        end = pos + len(ids)
                        work = self._work(res, seen, end)
                        if r:
                            self.planner.observe(work, res.timings, wall)
                        seen.update({t: end for t in work})
                        ids, pos = [res.token], end
                finally:
                    await self._close(session)

    def _work(self, res: StepResult, seen: dict[str, int], end: int) -> dict[str, tuple[int, int]]:
        e = self.info.exits[res.exit]
        deepest = self.planner.deepest_on
        return work_for_step(e, self.info.tiers, deepest, seen, end)

    # ---- Engine interface ----------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        await self.start()
        t_plan = time.perf_counter()
        plan = self._first_plan(req)
        decision_us = (time.perf_counter() - t_plan) * 1e6
        try:
            session = await self._open(len(req.prompt_ids) + req.max_tokens)
        except Exception as e:  # noqa: BLE001 - any transport failure: the engine cannot serve
            raise EngineError(f"cannot open a session: {e}") from e
        self._live[req.request_id] = session
        seen: dict[str, int] = {}
        ids, pos, g, replan = list(req.prompt_ids), 0, plan.exit, None
        inflight: asyncio.Future | None = None
        try:
            for i in range(req.max_tokens):
                if req.request_id in self._aborted:
                    return
                t_step = time.perf_counter()
                # shielded: a cancelled request lets its step finish, so the close below reaches every
                # tier the step opened a session on (a close racing a forward could miss the deeper ones)
                inflight = asyncio.ensure_future(self._step(session, ids, pos, g, req.sampling))
                try:
                    res = await asyncio.shield(inflight)
                except Exception as e:  # noqa: BLE001
                    raise EngineError(f"head tier failed: {e}") from e
                wall = (time.perf_counter() - t_step) * 1e3
                end = pos + len(ids)
                work = self._work(res, seen, end)
                self.planner.observe(work, res.timings, wall)
                seen.update({t: end for t in work})
                eos = res.token == self.tokenizer.eos_id and not req.ignore_eos
                finish = "stop" if eos else ("length" if i == req.max_tokens - 1 else None)
                if finish:  # before the yield: a consumer may stop iterating at the last token
                    self.planner.score(plan, i + 1, (time.perf_counter() - t_plan) * 1e3)
                yield TokenOutput(token_id=res.token, exit=res.exit, tier=res.tier,
                                  latency_ms=_split(res.timings, wall), degraded=res.degraded, reason=res.reason,
                                  replan=replan, infeasible=plan.infeasible and i == 0, decision_us=decision_us,
                                  predicted_ms=plan.predicted_ms if i == 0 else None,
                                  finish_reason=finish)
                if finish:
                    return
                ids, pos, replan, decision_us = [res.token], end, None, 0.0
                if req.budget_ms is not None and req.exit is None:
                    t0 = time.perf_counter()
                    remaining = req.budget_ms - (time.perf_counter() - req.arrival_s) * 1e3
                    new = self.planner.replan(g, remaining, req.max_tokens - i - 1)
                    decision_us = (time.perf_counter() - t0) * 1e6
                    if new is not None:
                        replan = Replan(at_token=i + 1, from_exit=g, to_exit=new.exit,
                                        reason=f"running late: {remaining:.1f} ms left for {req.max_tokens - i - 1} "
                                               f"tokens; exit {new.exit} predicts {new.predicted_ms:.1f} ms")
                        g = new.exit
        finally:
            self._live.pop(req.request_id, None)
            self._aborted.discard(req.request_id)
            await asyncio.shield(self._close_after(inflight, session))

    def _first_plan(self, req: GenerateRequest) -> Plan:
        if req.exit is not None:
            return self.planner.plan_for(req.exit, len(req.prompt_ids), req.max_tokens)
        remaining = None
        if req.budget_ms is not None:
            remaining = req.budget_ms - (time.perf_counter() - req.arrival_s) * 1e3
        return self.planner.plan(remaining, len(req.prompt_ids), req.max_tokens)

    async def _close_after(self, inflight: asyncio.Future | None, session) -> None:
        if inflight is not None and not inflight.done():
            await asyncio.wait({inflight}, timeout=getattr(self, "timeout_s", 30.0))
            if inflight.done() and not inflight.cancelled():
                inflight.exception()  # retrieved: a failed step of a cancelled request is not an error
        await self._close_quietly(session)

    async def _close_quietly(self, session) -> None:
        try:
            await self._close(session)
        except Exception:  # noqa: BLE001 - a tier that is gone has no session to free
            pass

    async def abort(self, request_id: str) -> None:
        session = self._live.get(request_id)
        if session is not None:
            self._aborted.add(request_id)
            await self._close_quietly(session)

    def live_requests(self) -> int:
        return len(self._live)


def _split(timings: dict[str, float], wall_ms: float) -> dict[str, float]:
    """Per-step latency split: tier compute as reported, every hop + the unreported rest as network."""
    out: dict[str, float] = {}
    reported = 0.0
    for k, v in timings.items():
        if k == "total":
            continue
        reported += v
        key = "network" if k.startswith("net:") else k
        out[key] = out.get(key, 0.0) + v
    out["network"] = out.get("network", 0.0) + max(0.0, wall_ms - reported)
    return out


def default_tiers(n_exits: int) -> list[str]:
    """Tier of each exit when nothing says otherwise: first on device, last on cloud, the rest on edge."""
    if n_exits == 1:
        return ["cloud"]
    return ["device"] + ["edge"] * (n_exits - 2) + ["cloud"]


# ---- in-process engine ----------------------------------------------------------------------------

@dataclass
class _LocalSession:
    cache: object                                                 # trunk.KVCache
    pending: dict[int, list] = field(default_factory=dict)        # segment s -> [(pos, h_1TD)] not yet run there


class LocalEngine(SteppedEngine):
    """Runs a FamilyModel in this process. Segment s = trunk layers [exits[s-1], exits[s]) + head s; each
    exit is assigned to a tier so the latency split and the planner work as they do over the relay.
    `delays_ms` adds a per-step delay to a tier (for tests and demos of the budget logic)."""

    def __init__(self, model, tokenizer, meta: dict | None = None, *, name: str = "familial",
                 exit_tiers: list[str] | None = None, delays_ms: dict[str, float] | None = None):
        super().__init__()
        import torch

        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.cfg
        self._torch = torch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="familial-local")
        self.exit_tiers = list(exit_tiers or default_tiers(cfg.G))
        losses = [e.get("val_loss") for e in (meta or {}).get("exits", [])] or [None] * cfg.G
        exits = [ExitInfo(g, layer, self.exit_tiers[g], losses[g]) for g, layer in enumerate(cfg.exits)]
        self.info = FamilyInfo(name, exits, list(dict.fromkeys(self.exit_tiers)), cfg.max_seq_len)
        self.delays_ms = dict(delays_ms or {})

    @classmethod
    def from_checkpoint(cls, path, **kw) -> "LocalEngine":
        from pathlib import Path

        from trunk.checkpoint import load_checkpoint

        model, tok, meta = load_checkpoint(path)
        kw.setdefault("name", Path(path).resolve().name)
        return cls(model, tok, meta, **kw)

    async def _open(self, max_tokens: int):
        from trunk.kv_cache import KVCache

        return _LocalSession(KVCache(max_tokens=max(1, max_tokens)))

    async def _close(self, session) -> None:
        session.cache = None
        session.pending.clear()

    async def _step(self, session, ids, pos, exit, sampling) -> StepResult:
        loop = asyncio.get_running_loop()
        token, timings = await loop.run_in_executor(self._pool, self._run, session, ids, pos, exit, sampling)
        tier = self.exit_tiers[exit]
        for t in self.info.tiers[: self.info.tiers.index(tier) + 1]:
            if self.delays_ms.get(t):
                await asyncio.sleep(self.delays_ms[t] / 1e3)
                timings[t] = timings.get(t, 0.0) + self.delays_ms[t]
        return StepResult(token=token, exit=exit, tier=tier, timings=timings)

    def _run(self, s: _LocalSession, ids: list[int], pos: int, g: int, sampling: SamplingParams):
        from relay.policy import sample
        from relay.types import Sampling

        torch, m = self._torch, self.model
        exits, timings = m.cfg.exits, {}
        if s.cache is None:
            raise EngineError("session closed")
        with torch.inference_mode():
            t0 = time.perf_counter()
            h_1TD = m.embed_tokens(torch.tensor([ids], dtype=torch.long))  # (1, T, D)
            p = pos
            for seg in range(g + 1):
                if seg:
                    pend = s.pending.pop(seg, [])
                    if pend:
                        p = pend[0][0]
                        h_1TD = torch.cat([x for _, x in pend] + [h_1TD], dim=1)  # (1, T', D)
                start = exits[seg - 1] if seg else 0
                h_1TD = m.run_layers(h_1TD, start, exits[seg], p, s.cache)
                if seg == g:
                    x_1TD = m.exit_features(g, h_1TD, p, s.cache)
                    logits_V = torch.nn.functional.linear(x_1TD[0, -1], m.unembed_weight(g)).float()
                elif m.cfg.branch_layers:
                    m.exit_features(seg, h_1TD, p, s.cache)  # keep head seg's branch KV complete
                t1 = time.perf_counter()
                tier = self.exit_tiers[seg]
                timings[tier] = timings.get(tier, 0.0) + (t1 - t0) * 1e3
                t0 = t1
            if g + 1 < m.cfg.G:
                s.pending.setdefault(g + 1, []).append((p, h_1TD))
            token = sample(logits_V, Sampling(sampling.temperature, sampling.top_p, sampling.seed), pos + len(ids) - 1)
        return token, timings

    async def check_health(self) -> dict[str, bool]:
        return {"local": True}

    async def stats(self) -> dict[str, int]:
        return {"local": len(self._live)}

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- relay chain engine ---------------------------------------------------------------------------

class RelayEngine(SteppedEngine):
    """Drives a relay chain through its head node. `tier_addresses` (tier -> host:port) adds health and
    session stats for every tier; the chain itself is discovered from the head's FamilyInfo."""

    def __init__(self, head: str, tokenizer, *, name: str = "familial", tier_addresses: dict[str, str] | None = None,
                 tls=None, timeout_s: float = 30.0, max_seq_len: int | None = None):
        super().__init__()
        self.tokenizer, self.name, self.timeout_s = tokenizer, name, timeout_s
        self._max_seq_len = max_seq_len
        self.head_address, self.head = head, None   # the client is made in `_setup`, on the serving loop
        self._tls = tls
        self.tier_addresses = dict(tier_addresses or {})
        self.clients: dict[str, object] = {}

    async def _setup(self) -> None:
        from relay.client import RelayClient

        self.head = RelayClient(self.head_address, tls=self._tls, timeout_s=self.timeout_s)
        fi = await self.head.family_info()
        exits, tiers = [], []
        for t in fi["tiers"]:
            tiers.append(t["tier"])
            for e in t["exits"]:
                exits.append(ExitInfo(e["index"], e["layer"], t["tier"], e["val_loss"]))
        if not fi.get("complete", True) or not exits:
            raise EngineError(f"relay chain at {self.head.target} is incomplete: {fi}")
        self.info = FamilyInfo(self.name, sorted(exits, key=lambda e: e.index), tiers, self._max_seq_len or 1 << 30)
        for t in fi["tiers"]:
            addr = self.tier_addresses.get(t["tier"]) or t.get("address")
            if t["tier"] == tiers[0]:
                self.clients[t["tier"]] = self.head
            elif addr:
                self.clients[t["tier"]] = RelayClient(addr, tls=self._tls, timeout_s=5.0)

    async def _open(self, max_tokens: int):
        return await self.head.open_session(f"srv-{uuid.uuid4().hex[:16]}", max_tokens=max_tokens)

    async def _step(self, session, ids, pos, exit, sampling) -> StepResult:
        from relay.types import Sampling

        r = await self.head.forward(session, ids, pos, exit=exit, deadline_s=self.timeout_s,
                                    sampling=Sampling(sampling.temperature, sampling.top_p, sampling.seed))
        return StepResult(token=r.token, exit=r.exit, tier=r.tier, degraded=r.degraded, reason=r.reason,
                          timings=dict(r.timings))

    async def _close(self, session) -> None:
        await self.head.close_session(session)

    async def check_health(self) -> dict[str, bool]:
        if not self.clients:
            return {"head": self.head is not None and await self.head.health()}
        names = list(self.clients)
        ok = await asyncio.gather(*(self.clients[t].health() for t in names))
        return dict(zip(names, ok))

    async def stats(self) -> dict[str, int]:
        """Live sessions per tier."""
        out = {}
        for t, c in self.clients.items():
            try:
                out[t] = (await c.stats())["live_sessions"]
            except Exception:  # noqa: BLE001
                out[t] = -1
        return out

    async def close(self) -> None:
        clients = {id(c): c for c in [self.head, *self.clients.values()] if c is not None}
        self.head, self.clients, self._started = None, {}, False
        for c in clients.values():
            await c.close()
