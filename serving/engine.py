"""The engine interface the HTTP handlers depend on, and its two implementations.

`Engine` (a typing.Protocol) is all the handlers see: `start()` / `close()` around serving,
`generate(request)` yields one `TokenOutput` per completion token, `abort(request_id)` stops a request
and frees its KV everywhere, `check_health()`, and what the API reports of exits: `exit_on_tier(tier)`
(the exit `"exit": "<tier>"` means) and `latency_model()` (for /v1/models).
The decode loop does not live here: a request is submitted whole to a tier engine (relay/tier.py),
which batches it with every other request and streams tokens back. What lives here is the exit
choice: the first exit from the latency budget (`exit_policy.ExitPlanner`), with or without
speculation, replans as the request runs late (sent to the engine as updates), and the latency model
fed by what each token took. A speculative round's tokens arrive together, so a round is timed whole:
the verify's reported tier times go to the (draft, target) pair's verify cost, the rest of the round,
per draft, to the draft exit's decode time.

- `LocalEngine`: tier engines in this process (one holding every exit, or a chain of them), driven
  directly: the in-process mode, on CPU or CUDA.
- `RelayEngine`: a chain of relay nodes, through one `Generate` stream to the head node.

The engines know nothing of HTTP, chat templates or detokenisation: token ids in, token ids out.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from relay.work import GenRequest, Speculative, TokenEvent
from serving.exit_policy import ExitInfo, ExitPlan, ExitPlanner, by_quality
from trunk.sampling import SamplingParams  # noqa: F401 - the handlers' import of it

__all__ = ["Engine", "EngineError", "GenerateRequest", "TokenOutput", "SamplingParams", "LocalEngine",
           "RelayEngine", "FamilyInfo", "Replan"]


class EngineError(RuntimeError):
    """The engine cannot serve the request at all (e.g. the head tier is unreachable)."""


# ---- what crosses the interface -------------------------------------------------------------------

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
    speculative: Speculative | None = None  # draft at the head tier, verify at the chosen exit
    speculative_auto: bool = False           # ... only where the planner finds plain decoding too slow for the budget


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
    latency_ms: dict[str, float]        # this token: per tier time, "network"
    degraded: bool = False
    reason: str = ""
    replan: Replan | None = None        # set on the first token made after a step-down
    infeasible: bool = False            # set on the first token when no exit fitted the budget
    predicted_ms: float | None = None   # first token only: the plan's predicted request time
    decision_us: float = 0.0            # router time spent choosing this token's exit
    finish_reason: str | None = None    # "stop" (end of sequence) | "length" (max_tokens)
    draft: bool = False                 # speculative: an accepted draft
    drafted: int = 0                    # speculative: on a round's last token, drafts checked and accepted
    accepted: int = 0
    speculative: bool | None = None     # first token only: whether the plan speculates ...
    tokens_per_round: float | None = None  # ... and the tokens per round it expects


@dataclass
class FamilyInfo:
    name: str
    exits: list[ExitInfo]
    tiers: list[str]              # chain order, head first
    max_seq_len: int


class Tokenizer(Protocol):
    eos_id: int
    eos_ids: tuple[int, ...]   # every id that ends a sequence (eos_id first)
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class Engine(Protocol):
    info: FamilyInfo              # valid once `start` has returned
    tokenizer: Tokenizer

    async def start(self) -> None:
        """Connect, build the tier engines, calibrate the latency model; a second call does nothing."""

    async def close(self) -> None:
        """Stop serving and free what `start` made; `start` may be called again after."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> dict[str, bool]: ...

    def exit_on_tier(self, tier: str) -> int | None:
        """The best-quality exit held by `tier`, or None when no tier of that name holds one."""

    def latency_model(self) -> dict:
        """The exit planner's current latency estimates per exit (empty before `start`)."""


# ---- planning over a token stream -----------------------------------------------------------------

class PlanningEngine:
    """Exit planning over a tier engine's token stream. Subclasses provide `_setup`, `_stream` (a
    GenRequest -> async iterator of TokenEvent) and `_update` (a replan)."""

    info: FamilyInfo
    tokenizer: Tokenizer
    planner: ExitPlanner | None = None   # made by `start`, from `info.exits`
    step_timeout_s: float | None = None

    def __init__(self):
        self._started = False
        self._start_lock = asyncio.Lock()
        self._live: set[str] = set()

    async def _setup(self) -> None: ...

    def _stream(self, req: GenRequest, deadline_ms: float) -> AsyncIterator[TokenEvent]: ...

    def _update(self, request_id: str, exit: int) -> None: ...

    async def start(self, calibrate_rounds: int = 2) -> None:
        async with self._start_lock:
            if self._started:
                return
            await self._setup()
            self.planner = ExitPlanner(self.info.exits)
            await self.calibrate(calibrate_rounds)
            self._started = True

    async def calibrate(self, rounds: int = 2, prompt_len: int = 8, new_tokens: int = 4) -> None:
        """A few unloaded requests per exit seed the latency model; the first round only warms up."""
        rng = random.Random(7)
        prompt = [rng.randrange(min(self.tokenizer.vocab_size, 256)) for _ in range(prompt_len)]
        for r in range(rounds + 1):
            for e in self.info.exits:
                req = GenRequest(f"calibrate-{uuid.uuid4().hex[:8]}", prompt, new_tokens, exit=e.index,
                                 ignore_eos=True)
                t_last = time.perf_counter()
                async for ev in self._stream(req, 0.0):
                    now = time.perf_counter()
                    if ev.token >= 0 and r:
                        self._observe(e.index, ev.index, prompt_len, (now - t_last) * 1e3)
                    t_last = now

    def _observe(self, g: int, index: int, prompt_len: int, ms: float) -> None:
        if index == 0:
            self.planner.model.observe_first(g, prompt_len, ms)
        else:
            self.planner.model.observe_token(g, ms)

    def _draft_exit(self, sp: Speculative) -> int:
        """The exit that drafts: the request's, or the head tier's deepest."""
        if sp.draft_exit is not None:
            return sp.draft_exit
        return max(e.index for e in self.info.exits if e.tier == self.info.tiers[0])

    def _first_plan(self, req: GenerateRequest, sp: Speculative | None) -> ExitPlan:
        remaining = None
        if req.budget_ms is not None:
            remaining = req.budget_ms - (time.perf_counter() - req.arrival_s) * 1e3
        return self.planner.plan(remaining, len(req.prompt_ids), req.max_tokens, sp, req.speculative_auto, req.exit)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        await self.start()
        t_plan = time.perf_counter()
        sp = req.speculative
        if sp is not None:
            sp = dataclasses.replace(sp, draft_exit=self._draft_exit(sp))
        known = sp is not None and 0 <= sp.draft_exit < len(self.info.exits)  # else the head refuses it
        plan = self._first_plan(req, sp if known else None)
        if req.speculative_auto and not plan.speculative:
            sp = None   # "auto": plain decoding fits (or nothing does), so the head does not draft
        decision_us = (time.perf_counter() - t_plan) * 1e6
        deadline_ms = 0.0
        if req.budget_ms is not None:
            deadline_ms = max(1.0, req.budget_ms - (time.perf_counter() - req.arrival_s) * 1e3)
        greq = GenRequest(req.request_id, list(req.prompt_ids), req.max_tokens, req.sampling, plan.exit,
                          ignore_eos=req.ignore_eos, eos_ids=tuple(self.tokenizer.eos_ids),
                          step_timeout_s=self.step_timeout_s, speculative=sp)
        g, replan, i = plan.exit, None, 0
        t_last = t_round = time.perf_counter()   # the last token, and the last one that was not an accepted draft
        self._live.add(req.request_id)
        events = self._stream(greq, deadline_ms)
        try:
            async for ev in events:
                now = time.perf_counter()
                if ev.token < 0:  # ended without a token: aborted, or the engine failed
                    if ev.finish_reason == "error":
                        raise EngineError(ev.error or "the engine failed")
                    return
                wall = (now - t_last) * 1e3
                t_last = now
                if ev.drafted:     # a round's drafts and verify arrive together: time the round as a whole
                    self._observe_round(sp, ev, (now - t_round) * 1e3)
                elif not ev.draft and not ev.degraded:
                    self._observe(ev.exit, ev.index, len(req.prompt_ids), wall)
                if not ev.draft:
                    t_round = now
                if ev.finish_reason:
                    self.planner.score(plan, ev.index + 1, (now - t_plan) * 1e3)
                first = i == 0
                yield TokenOutput(token_id=ev.token, exit=ev.exit, tier=self._tier_of(ev), latency_ms=self._latency_split(ev, wall),
                                  degraded=ev.degraded, reason=ev.reason, replan=replan,
                                  infeasible=plan.infeasible and first, decision_us=decision_us,
                                  predicted_ms=plan.predicted_ms if first else None, finish_reason=ev.finish_reason,
                                  draft=ev.draft, drafted=ev.drafted, accepted=ev.accepted,
                                  speculative=plan.speculative if first else None,
                                  tokens_per_round=plan.tokens_per_round if first and plan.speculative else None)
                if ev.finish_reason:
                    return
                i, replan, decision_us = i + 1, None, 0.0
                if req.budget_ms is not None and req.exit is None:
                    t0 = time.perf_counter()
                    replan = self._replan(req, g, i, sp if known else None)
                    decision_us = (time.perf_counter() - t0) * 1e6
                    if replan is not None:
                        g = replan.to_exit
                        self._update(req.request_id, g)
        finally:
            await events.aclose()  # a request left early: its stream aborts it on every tier now, not at GC
            self._live.discard(req.request_id)

    def _replan(self, req: GenerateRequest, g: int, i: int, sp: Speculative | None) -> Replan | None:
        """A step-down after token i when the rest no longer fits at exit g (speculating as the tier does)."""
        remaining = req.budget_ms - (time.perf_counter() - req.arrival_s) * 1e3
        new = self.planner.replan(g, remaining, req.max_tokens - i, sp)
        if new is None:
            return None
        return Replan(at_token=i, from_exit=g, to_exit=new.exit,
                      reason=f"running late: {remaining:.1f} ms left for {req.max_tokens - i} "
                             f"tokens; exit {new.exit} predicts {new.predicted_ms:.1f} ms")

    def _tier_of(self, ev: TokenEvent) -> str:
        return ev.tier

    def _observe_round(self, sp: Speculative | None, ev: TokenEvent, round_ms: float) -> None:
        """A verified round (closing event `ev`, `round_ms` since the previous round): its acceptance for
        the (draft, verifying exit) pair; unless degraded, the verify's round trip (the tiers' reported
        times) for the pair and the rest, per draft, as decode steps of the draft exit."""
        draft = self._draft_exit(sp if sp is not None else Speculative())
        verify_ms = sum(ev.timings.values()) if ev.timings and not ev.degraded else None
        self.planner.model.observe_round(draft, ev.exit, ev.drafted, ev.accepted, verify_ms)
        if verify_ms is not None:
            self.planner.model.observe_token(draft, max(0.0, round_ms - verify_ms) / ev.drafted)

    def acceptance(self, draft: int, target: int) -> float | None:
        """Live fraction of drafts accepted for this pair (None before any round)."""
        p = self.planner.model.pairs.get((draft, target)) if self.planner is not None else None
        return p.accepted / p.drafted if p is not None and p.drafted > 0 else None

    def _latency_split(self, ev: TokenEvent, wall_ms: float) -> dict[str, float]:
        return _split(ev, wall_ms)

    async def abort(self, request_id: str) -> None:
        """Handlers stop a request by closing its `generate` iterator; this is for callers without it."""
        self._live.discard(request_id)

    def live_requests(self) -> int:
        return len(self._live)

    def exit_on_tier(self, tier: str) -> int | None:
        return next((e.index for e in by_quality(self.info.exits) if e.tier == tier), None)

    def latency_model(self) -> dict:
        return self.planner.snapshot() if self.planner is not None else {}


def _split(ev: TokenEvent, wall_ms: float) -> dict[str, float]:
    """Per-token latency split: tier time as reported, every hop + the unreported rest as network."""
    out: dict[str, float] = {}
    reported = 0.0
    for k, v in ev.timings.items():
        reported += v
        key = "network" if k.startswith("net:") else k
        out[key] = out.get(key, 0.0) + v
    out["network"] = out.get("network", 0.0) + max(0.0, wall_ms - reported)
    return out


# ---- in-process engine ----------------------------------------------------------------------------

class LocalEngine(PlanningEngine):
    """Tier engines in this process over a FamilyModel. `tiers` (e.g. "device=0,edge=1,cloud=2..")
    names which tier holds each exit; with `chain=True` each tier is its own engine (a relay chain
    without the network: its own pool, its own steps), else one engine holds every exit and tier names
    only label the tokens. `delays_ms` adds a per-step delay to a tier (tests and demos of the budget
    logic; it implies a chain)."""

    def __init__(self, model, tokenizer, meta: dict | None = None, *, name: str = "familial", tiers: str | None = None,
                 chain: bool = False, delays_ms: dict[str, float] | None = None, device=None,
                 kv_memory_mb: float | None = None, max_slots: int | None = None, engine_config=None,
                 step_timeout_s: float | None = None, cuda_graphs: bool = True):
        super().__init__()
        from deploy.manifest import default_tiers, parse_tier_spec

        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.cfg
        self.tier_spec = parse_tier_spec(tiers or default_tiers(cfg.G), cfg.G)
        self.exit_tiers = {g: t for t, gs in self.tier_spec for g in gs}
        losses = [e.get("val_loss") for e in (meta or {}).get("exits", [])] or [None] * cfg.G
        exits = [ExitInfo(g, layer, self.exit_tiers[g], losses[g]) for g, layer in enumerate(cfg.exits)]
        self.info = FamilyInfo(name, exits, [t for t, _ in self.tier_spec], cfg.max_seq_len)
        self.delays_ms = dict(delays_ms or {})
        self.chain = chain or bool(self.delays_ms)
        self.device, self.kv_memory_mb, self.max_slots = device, kv_memory_mb, max_slots
        self.engine_config, self.step_timeout_s = engine_config, step_timeout_s
        self.cuda_graphs = cuda_graphs
        self.engines: list = []

    @classmethod
    def from_checkpoint(cls, path, *, device=None, dtype=None, **kw) -> "LocalEngine":
        from pathlib import Path

        import torch

        from trunk.checkpoint import load_checkpoint

        model, tok, meta = load_checkpoint(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.to(device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
        kw.setdefault("name", Path(path).resolve().name)
        return cls(model, tok, meta, device=device, **kw)

    async def _setup(self) -> None:
        from relay.node import NodeConfig, make_pool
        from relay.tier import LocalDownstream, TierConfig, TierEngine
        from trunk.stage import Stage

        groups = self.tier_spec if self.chain else [("local", [g for _, gs in self.tier_spec for g in gs])]
        cuda = str(self.device or "cpu").startswith("cuda")
        base = self.engine_config or TierConfig(max_batch_tokens=8192 if cuda else 2048)
        down = None
        for tier, exits in reversed(groups):
            stage = Stage(self.model, exits)
            pool = make_pool(stage, NodeConfig(kv_memory_mb=self.kv_memory_mb, max_slots=self.max_slots),
                             self.device)
            conf = dataclasses.replace(base, step_delay_ms=self.delays_ms.get(tier, 0.0))
            eng = TierEngine(stage, pool, tier, down, conf)
            if self.cuda_graphs:
                eng.capture_graphs()
            eng.start()
            self.engines.insert(0, eng)
            down = LocalDownstream(eng)

    def set_delay(self, tier: str, ms: float) -> None:
        """TEST ONLY: change a tier's per-step delay while serving (a tier that slows down)."""
        self.delays_ms[tier] = ms
        for e in self.engines:
            if e.tier == tier:
                e.conf.step_delay_ms = ms

    def _stream(self, req: GenRequest, deadline_ms: float) -> AsyncIterator[TokenEvent]:
        if deadline_ms > 0:
            req.deadline = time.monotonic() + deadline_ms / 1e3
        return self.engines[0].stream(req)

    def _update(self, request_id: str, exit: int) -> None:
        self.engines[0].update(request_id, exit)

    def _tier_of(self, ev: TokenEvent) -> str:
        return self.exit_tiers.get(ev.exit, ev.tier)

    def _latency_split(self, ev: TokenEvent, wall_ms: float) -> dict[str, float]:
        """One engine for every exit: its time is the labelled tier's (the token's), as the tokens say."""
        out = _split(ev, wall_ms)
        if len(self.engines) == 1 and self.engines[0].tier in out:
            t = self._tier_of(ev)
            out[t] = out.get(t, 0.0) + out.pop(self.engines[0].tier)
        return out

    async def abort(self, request_id: str) -> None:
        await super().abort(request_id)
        if self.engines:
            self.engines[0].abort(request_id)

    async def check_health(self) -> dict[str, bool]:
        return {e.tier: e._task is not None and not e._task.done() for e in self.engines} or {"local": False}

    async def stats(self) -> dict[str, int]:
        return {e.tier: len(e.seqs) for e in self.engines}

    async def close(self) -> None:
        for e in self.engines:
            await e.stop()
        self.engines, self._started = [], False


# ---- relay chain engine ---------------------------------------------------------------------------

class RelayEngine(PlanningEngine):
    """A relay chain through its head node. `tier_addresses` (tier -> host:port) adds health and session
    stats for every tier; the chain itself is discovered from the head's FamilyInfo."""

    def __init__(self, head: str, tokenizer, *, name: str = "familial", tier_addresses: dict[str, str] | None = None,
                 tls=None, timeout_s: float = 30.0, max_seq_len: int | None = None, admin_token: str | None = None):
        super().__init__()
        self.tokenizer, self.name, self.timeout_s = tokenizer, name, timeout_s
        self.step_timeout_s = timeout_s
        self._max_seq_len = max_seq_len
        self.head_address, self.head = head, None   # clients are made in `_setup`, on the serving loop
        self._tls, self._admin = tls, admin_token
        self.tier_addresses = dict(tier_addresses or {})
        self.clients: dict[str, object] = {}
        self.gen = None

    async def _setup(self) -> None:
        from relay.client import RelayClient

        self.head = RelayClient(self.head_address, tls=self._tls, timeout_s=self.timeout_s, admin_token=self._admin)
        try:
            fi = await self.head.family_info()
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"cannot reach the head tier at {self.head_address}: {e}") from e
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
                self.clients[t["tier"]] = RelayClient(addr, tls=self._tls, timeout_s=5.0, admin_token=self._admin)
        self.gen = self.head.generate_stream()

    async def _events(self, req: GenRequest, deadline_ms: float) -> AsyncIterator[TokenEvent]:
        if self.gen is None or self.gen.error is not None:  # a head that restarted: a fresh stream
            self.gen = self.head.generate_stream()
        events = self.gen.submit(req, deadline_ms)
        try:
            async for ev in events:
                yield ev
        finally:
            await events.aclose()

    def _stream(self, req: GenRequest, deadline_ms: float) -> AsyncIterator[TokenEvent]:
        return self._events(req, deadline_ms)

    def _update(self, request_id: str, exit: int) -> None:
        self.gen.update(request_id, exit)

    async def check_health(self) -> dict[str, bool]:
        if not self.clients:
            return {"head": self.head is not None and await self.head.health()}
        names = list(self.clients)
        ok = await asyncio.gather(*(self.clients[t].health() for t in names))
        return dict(zip(names, ok))

    async def stats(self) -> dict[str, int]:
        """Live sequences per tier."""
        out = {}
        for t, c in self.clients.items():
            try:
                out[t] = (await c.stats())["live_sessions"]
            except Exception:  # noqa: BLE001
                out[t] = -1
        return out

    async def close(self) -> None:
        if self.gen is not None:
            await self.gen.close()
        clients = {id(c): c for c in [self.head, *self.clients.values()] if c is not None}
        self.head, self.clients, self.gen, self._started = None, {}, None, False
        for c in clients.values():
            await c.close()
