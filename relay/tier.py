"""The tier engine: one tier's scheduler over its stage and KV pool, transport-free.

Work arrives as `Item`s (rows of one sequence: a prompt chunk, a decode token, or the pending + new
boundary states an upstream tier sends) and, at the head tier, as whole requests (`generate`), whose
decode loop lives here. Every engine step takes all ready work -- decode rows of running sequences,
chunks of prefills under a token budget, pending catch-up -- into ONE batched `Stage.forward`.
Sequences that exit at this tier are sampled there in one batched call; the rest go to the next tier
together, as one `StepMessage` per step, while this tier goes on with other sequences (micro-batches:
the head runs at most 1/`micro_batches` of the runnable sequences per step when a deeper tier exists,
so the tiers work on different groups at the same time instead of idling in turn; deeper tiers take
each group whole as it arrives -- splitting it again only multiplies their steps).

KV-consistency invariant (one implementation, here): a tier's cache covers every position of a
sequence up to its length; `acked` is what the next tier holds. A message to the next tier carries
every position in [acked, end) -- the positions that exited shallower earlier and the new ones -- read
from the pool's output log. A message that starts past what the receiver holds is refused with its
length (`FAILED_PRECONDITION`), and the sender resends from there (replay after a restart or an
eviction); one that starts before it is a rewind (the receiver truncates and recomputes).

Slots: a sequence takes a pool slot on its first item. With no free slot, the least recently used
sequence with no work at this tier is evicted (preempted): its KV is dropped here and recomputed from
the upstream's log (or, at the head, from the request's tokens) when it comes back. Nothing is lost
and nothing runs out of memory; the client only sees latency.

Faults: every item carries a deadline. A deeper tier that errs, is unreachable or misses the deadline
(minus a margin) makes this tier answer from its own deepest exit, marked degraded; after a failure the
next tier is left alone for `down_cooldown_s` (answers degrade at once instead of each waiting out its
deadline), then tried again. Pending positions stay pending, so exactness returns with the tier.

Speculative decoding (relay/speculative.py holds the round state): the head drafts k tokens with a
shallow exit in local steps, then one verify item (`Item.verify`) goes to the target exit's tier like
any deep step, pending states and all; there the target's logits at the k+1 rows check the drafts
(trunk.sampling.verify_drafts) and that tier cuts its sequence back to the accepted prefix; every tier
on the way back does the same from the reply's `length`, so the invariant holds with no extra message.
A tier that cannot reach deeper checks the drafts against its own deepest exit (degraded).

This file knows nothing of gRPC, HTTP or tokenizers: relay/node.py drives it over gRPC, serving's
in-process engine drives a chain of these directly. Legend: n rows, N packed rows, D d_model.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

import torch

from relay.speculative import SpecState
from relay.work import EngineError, GenRequest, Item, Result, SeqStep, StepMessage, StepReply, TokenEvent, Verify
from trunk.kv_pool import KVPool
from trunk.sampling import FIXED, FIXED_POLICY, SamplingError, probs, verify_drafts
from trunk.stage import SeqRun, Stage, StageError, StageOut

log = logging.getLogger("familial.tier")


class Downstream(Protocol):
    """The next (deeper) tier, however it is reached."""
    tier: str

    async def step(self, msg: StepMessage, timeout: float) -> StepReply: ...

    async def release(self, seq_ids: list[str]) -> None: ...


@dataclass
class TierConfig:
    max_batch_tokens: int = 2048        # rows per engine step (decode rows count one each)
    max_batch_seqs: int = 256           # sequences per engine step
    micro_batches: int = 3              # at the head, with a deeper tier: split runnable sequences into this
                                        # many groups (3 for a 3-tier chain on one H200, nano relay: 4,437 tok/s,
                                        # 1: 3,639); deeper tiers do not split what arrives
    deadline_margin_ms: float = 25.0    # kept back from a deadline to answer degraded in time
    step_timeout_s: float = 30.0        # deadline of a step whose request set none
    down_cooldown_s: float = 1.0        # after the next tier failed, degrade at once for this long
    max_sessions: int = 4096            # sequences tracked (resident or not)
    idle_timeout_s: float = 600.0       # a sequence with no work this long is released
    max_message_bytes: int = 64 << 20   # hidden states per message to the next tier (split above)
    offload: bool = True                # run the stage in a worker thread (the event loop keeps serving) ...
    inline_rows: int = 1                # ... except steps of at most this many rows: a batch-1 decode step costs
                                        # less than the hop to the thread and back (CPU: ~0.3 ms per tier)
    decode_burst: int = 8               # CUDA graphs, last tier: up to this many greedy decode steps per host round
    step_delay_ms: float = 0.0          # TEST ONLY: added after every step (stands in for a slow tier)


@dataclass
class SeqState:
    id: str
    n_seg: int
    slot: int | None = None
    seg_lens: list[int] = field(default_factory=list)   # positions held by each local segment
    acked: int = 0                                      # positions the next tier holds
    active: int = 0                                     # unresolved items of this sequence here
    running: bool = False                               # in this step's batch or in flight deeper
    epoch: int = 0                                      # forwards sent (a late reply of an old one is ignored)
    last_used: float = field(default_factory=time.monotonic)
    owner: str = ""                                     # capability that must accompany its requests
    max_tokens: int = 0
    closing: bool = False
    src: str = ""                                       # upstream that created it ("" = this tier's clients)

    def __post_init__(self):
        if not self.seg_lens:
            self.seg_lens = [0] * self.n_seg

    @property
    def length(self) -> int:
        return self.seg_lens[0]

    def truncate(self, pos: int) -> None:
        self.seg_lens = [min(x, pos) for x in self.seg_lens]
        self.acked = min(self.acked, pos)


@dataclass
class _Chunk:
    item: Item
    seq: SeqState
    take: int
    run: SeqRun | None = None
    epoch: int = 0          # the sequence's forward count when this chunk went deeper


@dataclass
class GenSeq:
    req: GenRequest
    tokens: list[int]
    emit: Callable[[TokenEvent], None]
    produced: int = 0
    finished: bool = False
    exit: int | None = None
    next_item: Item | None = None       # its latest submitted step
    spec: SpecState | None = None       # speculative decoding (None: one target step per token)


class LocalDownstream:
    """The next tier in the same process: a direct call (the in-process chain; tests)."""

    def __init__(self, engine: "TierEngine"):
        self.engine, self.tier = engine, engine.tier

    async def step(self, msg: StepMessage, timeout: float) -> StepReply:
        return await asyncio.wait_for(self.engine.step(msg), timeout)

    async def release(self, seq_ids: list[str]) -> None:
        for sid in seq_ids:
            self.engine.close(sid)


class TierEngine:
    def __init__(self, stage: Stage, pool: KVPool, tier: str, down: Downstream | None = None,
                 config: TierConfig | None = None):
        self.stage, self.pool, self.tier, self.down = stage, pool, tier, down
        self.conf = config or TierConfig()
        self.seqs: OrderedDict[str, SeqState] = OrderedDict()  # least recently used first
        self.queue: deque[Item] = deque()
        self.gens: dict[str, GenSeq] = {}
        self._wake = asyncio.Event()
        self._after: list[Callable[[], None]] = []   # after_step callbacks not run yet
        self._task: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()
        self._down_bad_until = 0.0
        self._down_error = ""
        self._releases: list[str] = []
        self.counters = {"steps": 0, "rows": 0, "items": 0, "evicted": 0, "degraded": 0, "replays": 0, "bursts": 0}
        self.stage_s = 0.0  # wall seconds in stage calls (the rest of a busy tier's time is host work)
        self.n_seg = len(stage.segments)
        self.out_log = stage.log_index(self.n_seg - 1)

    # ---- life cycle ----------------------------------------------------------------------------
    def capture_graphs(self) -> float:
        """CUDA: capture the stage's decode steps as graphs (trunk/cuda_graphs.py); seconds it took."""
        if self.pool.device.type != "cuda" or not hasattr(self.stage, "segment_math") or self.pool.scratch_slot is None:
            return 0.0
        from trunk.cuda_graphs import DecodeGraphs

        self.stage.graphs = DecodeGraphs(self.stage, self.pool, max_batch=min(self.conf.max_batch_seqs, self.pool.n_slots))
        secs = self.stage.graphs.capture()
        log.info("tier %s: %d CUDA graphs captured in %.1f s", self.tier, len(self.stage.graphs.graphs), secs)
        return secs

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        for t in [self._task, *self._bg]:
            if t is not None:
                t.cancel()
        for t in [self._task, *self._bg]:
            if t is not None:
                await asyncio.gather(t, return_exceptions=True)
        self._task = None
        self._run_after()
        for gs in list(self.gens.values()):
            self._finish_gen(gs, "abort", "engine stopped")

    # ---- sequences -----------------------------------------------------------------------------
    def open(self, seq_id: str, *, owner: str = "", max_tokens: int = 0, src: str = "") -> SeqState:
        if seq_id in self.seqs:
            raise EngineError("ALREADY_EXISTS", f"sequence {seq_id!r} already exists")
        while len(self.seqs) >= self.conf.max_sessions:
            if not self._evict_idle(release=True):
                raise EngineError("RESOURCE_EXHAUSTED", f"all {self.conf.max_sessions} sequences are busy; try again later")
        cap = min(max_tokens or self.pool.shape.max_len, self.pool.shape.max_len)
        s = SeqState(seq_id, self.n_seg, owner=owner, max_tokens=cap, src=src)
        self.seqs[seq_id] = s
        return s

    def get(self, seq_id: str, owner: str | None = None) -> SeqState:
        s = self.seqs.get(seq_id)
        if s is None or s.closing:
            raise EngineError("NOT_FOUND", f"unknown sequence {seq_id!r} (never opened, closed or released)")
        if owner is not None and s.owner and owner != s.owner:
            raise EngineError("PERMISSION_DENIED", f"sequence {seq_id!r} belongs to another client")
        return s

    def close(self, seq_id: str) -> bool:
        """Release a sequence here and on every deeper tier (after its work in flight, if any)."""
        s = self.seqs.get(seq_id)
        if s is None:
            return False
        s.closing = True
        gs = self.gens.get(seq_id)
        if gs is not None and not gs.finished:
            self._finish_gen(gs, "abort", "aborted")
        if s.active == 0:
            self._drop(s)
        return True

    def release_from(self, src: str, keep: set[str] | None = None, idle_s: float = 0.0) -> int:
        """Release the sequences an upstream created that it no longer knows (orphans after a crash), once
        they have had no work for `idle_s`: a live set is a snapshot, and a Step sent after it may have
        made a sequence here that the snapshot does not name yet."""
        n, now = 0, time.monotonic()
        for s in list(self.seqs.values()):
            if (s.src == src and s.active == 0 and now - s.last_used >= idle_s
                    and (keep is None or s.id not in keep)):
                self.close(s.id)
                n += 1
        return n

    def _drop(self, s: SeqState) -> None:
        self.seqs.pop(s.id, None)
        self.gens.pop(s.id, None)
        if s.slot is not None:
            self.pool.free(s.slot)
            s.slot = None
            self._wake.set()
        if self.down is not None and (s.acked > 0 or s.epoch > 0):
            self._releases.append(s.id)
            self._spawn(self._flush_releases())

    async def _flush_releases(self) -> None:
        await asyncio.sleep(0)  # gather the releases of one step into one call
        ids, self._releases = self._releases, []
        if ids and self.down is not None:
            try:
                await self.down.release(ids)
            except Exception as e:  # noqa: BLE001 - a tier that is gone has nothing to release
                log.info("release on %s failed: %s", self.down.tier, e)

    def _evict_idle(self, release: bool = False) -> bool:
        """Free the least recently used idle resident sequence's slot (or forget the entry)."""
        for s in self.seqs.values():
            if s.active == 0 and not s.running and not s.closing and (s.slot is not None or release):
                if release:
                    self.close(s.id)
                else:
                    self.pool.free(s.slot)
                    s.slot, s.seg_lens = None, [0] * self.n_seg
                self.counters["evicted"] += 1
                return True
        return False

    def sweep_idle(self) -> int:
        now, n = time.monotonic(), 0
        for s in list(self.seqs.values()):
            if s.active == 0 and not s.running and now - s.last_used > self.conf.idle_timeout_s:
                self.close(s.id)
                n += 1
        return n

    # ---- submitting work -----------------------------------------------------------------------
    def submit(self, item: Item, seq: SeqState | None = None) -> None:
        s = seq or self.get(item.seq_id)
        s.active += 1
        s.last_used = time.monotonic()
        self.seqs.move_to_end(s.id)
        item.arrival = time.perf_counter()
        item.tag_seq = s
        item.done_cb = self._item_done
        self.queue.append(item)
        self.counters["items"] += 1
        self._wake.set()

    def _item_done(self, it: Item, res: Result) -> None:
        s = it.tag_seq
        s.active -= 1
        s.last_used = time.monotonic()
        if it.sink is not None:
            it.sink(it, res)
        if s.closing and s.active == 0:
            self._drop(s)

    async def forward(self, item: Item) -> Result:
        """One item, awaited (the per-session Forward API)."""
        fut = asyncio.get_running_loop().create_future()
        item.sink = lambda it, res: fut.done() or fut.set_result(res)
        self.submit(item)
        return await fut

    async def step(self, msg: StepMessage) -> StepReply:
        """A batch from the upstream tier: every sequence's rows at once; one result each."""
        fut = asyncio.get_running_loop().create_future()
        self.submit_step(msg, lambda reply: fut.done() or fut.set_result(reply))
        return await fut

    def submit_step(self, msg: StepMessage, done: Callable[[StepReply], None]) -> None:
        """`step` without a task of its own: `done` gets the reply once every sequence has its result
        (at once, from here, when every sequence was refused)."""
        results: list[Result | None] = [None] * len(msg.seqs)
        left = [len(msg.seqs)]

        def sink(it: Item, res: Result):
            results[it.tag] = res
            left[0] -= 1
            if left[0] == 0:
                done(StepReply(results, self.tier))

        now, row = time.monotonic(), 0
        for k, sq in enumerate(msg.seqs):
            x = msg.hidden[row:row + sq.count]
            row += sq.count
            try:
                if sq.verify is not None:
                    self._check_verify(sq.verify)
                s = self.seqs.get(sq.seq_id) or self.open(sq.seq_id, src=msg.src)
                item = Item(sq.seq_id, sq.pos, x, sq.want, sq.policy, sq.sampling, sq.fill_only,
                            now + sq.deadline_ms / 1e3, sink, tag=k, verify=sq.verify)
                self.submit(item, s)
            except EngineError as e:
                sink(Item(sq.seq_id, sq.pos, x, None, tag=k), Result(error=(e.code, str(e)), tier=self.tier))
        if not msg.seqs:
            done(StepReply([], self.tier))

    def _check_verify(self, v: Verify) -> None:
        V = self.stage.cfg.vocab_size
        if any(not 0 <= d < V for d in v.drafts):
            raise EngineError("INVALID_ARGUMENT", f"draft token ids must lie in [0, {V})")
        if v.draft_p is not None and tuple(v.draft_p.shape) != (len(v.drafts), V):
            raise EngineError("INVALID_ARGUMENT", f"draft distributions must be ({len(v.drafts)}, {V}), "
                                                  f"got {tuple(v.draft_p.shape)}")

    # ---- head: the decode loop -----------------------------------------------------------------
    def generate(self, req: GenRequest, emit: Callable[[TokenEvent], None]) -> None:
        """Start a request; `emit` gets one TokenEvent per token (the last one has finish_reason)."""
        if not self.stage.has_embedding:
            raise EngineError("FAILED_PRECONDITION", f"tier {self.tier} takes hidden states; generate at the head")
        if not req.prompt_ids:
            raise EngineError("INVALID_ARGUMENT", "empty prompt")
        V = self.stage.cfg.vocab_size
        if any(not 0 <= t < V for t in req.prompt_ids):
            raise EngineError("INVALID_ARGUMENT", f"token ids must lie in [0, {V})")
        if len(req.prompt_ids) + req.max_tokens > self.pool.shape.max_len:
            raise EngineError("INVALID_ARGUMENT", f"prompt ({len(req.prompt_ids)}) + max_tokens ({req.max_tokens}) "
                                                  f"exceeds the context length {self.pool.shape.max_len}")
        if req.max_tokens < 1:
            raise EngineError("INVALID_ARGUMENT", "max_tokens must be >= 1")
        self._check_exit(req.exit)
        try:
            req.sampling.validate()
            req.policy.validate()
        except SamplingError as e:
            raise EngineError("INVALID_ARGUMENT", str(e)) from None
        spec = self._spec_state(req)
        s = self.open(req.request_id)
        gs = GenSeq(req, list(req.prompt_ids), emit, exit=req.exit, spec=spec)
        self.gens[req.request_id] = gs
        self._submit_gen(gs, s, 0)

    async def stream(self, req: GenRequest) -> AsyncIterator[TokenEvent]:
        """`generate` as an async iterator; leaving it early aborts the request and frees its KV."""
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.generate(req, q.put_nowait)
        done = False
        try:
            while not done:
                ev = await q.get()
                done = ev.finish_reason is not None
                yield ev
        finally:
            if not done:
                self.abort(req.request_id)

    def update(self, request_id: str, exit: int | None) -> bool:
        """Change a running request's exit from its next token on (a replan by budget)."""
        gs = self.gens.get(request_id)
        if gs is None or gs.finished:
            return False
        self._check_exit(exit)
        gs.exit = exit
        s = self.seqs.get(request_id)
        for it in self.queue:  # its next step may already wait here: it takes the new exit too
            if it.draft or it.verify is not None:  # a speculative round finishes with the exit it began with
                continue
            if it.seq_id == request_id and it.done == 0 and s is not None and not s.running:
                it.want = self.stage.cfg.G - 1 if exit is None else exit
        return True

    def abort(self, request_id: str) -> bool:
        return self.close(request_id)

    def _spec_state(self, req: GenRequest) -> SpecState | None:
        sp = req.speculative
        if sp is None:
            return None
        draft = self.stage.deepest_exit if sp.draft_exit is None else sp.draft_exit
        if not self.stage.exits[0] <= draft <= self.stage.deepest_exit:
            raise EngineError("INVALID_ARGUMENT", f"draft exit {draft} is not on the head tier {self.tier} "
                                                  f"(exits {self.stage.exits})")
        if not 1 <= sp.k <= 64:
            raise EngineError("INVALID_ARGUMENT", f"speculative k must lie in [1, 64], got {sp.k}")
        if req.policy.kind != FIXED:
            raise EngineError("INVALID_ARGUMENT", "speculative decoding needs a fixed exit, not a confidence policy")
        return SpecState(sp, draft)

    def _check_exit(self, exit: int | None) -> None:
        if exit is not None and not self.stage.exits[0] <= exit < self.stage.cfg.G:
            raise EngineError("INVALID_ARGUMENT", f"exit {exit} out of range: this chain serves exits "
                                                  f"{self.stage.exits[0]}..{self.stage.cfg.G - 1}")

    def _step_deadline(self, req: GenRequest) -> float:
        timeout = req.step_timeout_s if req.step_timeout_s is not None else self.conf.step_timeout_s
        return min(req.deadline, time.monotonic() + timeout)

    def _submit_gen(self, gs: GenSeq, s: SeqState, pos: int) -> None:
        want = self.stage.cfg.G - 1 if gs.exit is None else gs.exit
        if gs.spec is not None and gs.produced > 0 and want > gs.spec.draft_exit:
            self._submit_spec(gs, s, want)
            return
        x = gs.tokens[pos:]
        gs.next_item = Item(s.id, pos, x, want, gs.req.policy, gs.req.sampling, deadline=self._step_deadline(gs.req),
                            sink=self._gen_result, tag=gs, must_answer=True)
        self.submit(gs.next_item, s)

    def _submit_spec(self, gs: GenSeq, s: SeqState, target: int) -> None:
        """The next step of a speculative round: a draft step at the draft exit, or the verify."""
        sp = gs.spec
        if not sp.drafts:
            sp.round_k = sp.next_k(gs.req.max_tokens - gs.produced)
            if sp.round_k == 0:  # one token left: a plain target step
                gs.next_item = Item(s.id, len(gs.tokens) - 1, gs.tokens[-1:], target, FIXED_POLICY, gs.req.sampling,
                                    deadline=self._step_deadline(gs.req), sink=self._gen_result, tag=gs,
                                    must_answer=True)
                self.submit(gs.next_item, s)
                return
        pos = len(gs.tokens) - 1 + len(sp.drafts)
        last = sp.drafts[-1] if sp.drafts else gs.tokens[-1]
        item = Item(s.id, pos, [last], sp.draft_exit, FIXED_POLICY, gs.req.sampling,
                    deadline=self._step_deadline(gs.req), sink=self._gen_result, tag=gs, must_answer=True)
        if len(sp.drafts) < sp.round_k:
            item.draft = True
        else:
            item.want = target
            item.verify = Verify(list(sp.drafts), None if gs.req.sampling.greedy else torch.stack(sp.draft_p))
            sp.round_t0 = time.perf_counter()
        gs.next_item = item
        self.submit(item, s)

    def _gen_result(self, item: Item, res: Result) -> None:
        gs: GenSeq = item.tag
        if gs.finished:
            return
        if not res.ok:
            self._finish_gen(gs, "error", f"{res.error[0]}: {res.error[1]}")
            self.close(gs.req.request_id)
            return
        if item.draft:
            self._take_draft(gs, res)
        elif item.verify is not None:
            if self._take_round(gs, item.verify, res):
                return
        elif self._take(gs, res.token, res):
            return
        s = self.seqs.get(gs.req.request_id)
        if s is not None:
            self._submit_gen(gs, s, len(gs.tokens) - 1)

    def _take(self, gs: GenSeq, token: int, res: Result, **spec) -> bool:
        """Emit one token of a request; True when that finished it."""
        gs.tokens.append(token)
        gs.produced += 1
        eos = token in gs.req.eos_ids and not gs.req.ignore_eos
        finish = "stop" if eos else ("length" if gs.produced >= gs.req.max_tokens else None)
        gs.emit(TokenEvent(token, res.exit, res.tier, gs.produced - 1, res.degraded, res.reason, res.timings,
                           res.confidence, finish, **spec))
        if finish:
            gs.finished = True
            self.close(gs.req.request_id)
        return finish is not None

    def _take_draft(self, gs: GenSeq, res: Result) -> None:
        sp = gs.spec
        sp.drafts.append(res.token)
        if res.draft_p is not None:
            sp.draft_p.append(res.draft_p)
        sp.observe_draft(res.total_ms)
        if res.token in gs.req.eos_ids and not gs.req.ignore_eos:
            sp.round_k = len(sp.drafts)  # nothing follows an end of text: verify now

    def _take_round(self, gs: GenSeq, v: Verify, res: Result) -> bool:
        """Emit a verified round: the accepted drafts, then the token after them; True when finished."""
        sp, k, a = gs.spec, len(v.drafts), res.accepted
        sp.observe_round(k, a, (time.perf_counter() - sp.round_t0) * 1e3)
        sp.drafts, sp.draft_p = [], []
        quiet = Result(exit=res.exit, tier=res.tier, degraded=res.degraded, reason=res.reason)
        for t in v.drafts[:a]:
            if self._take(gs, t, quiet, draft=True):
                return True
        return self._take(gs, res.token, res, drafted=k, accepted=a)

    def _finish_gen(self, gs: GenSeq, reason: str, msg: str) -> None:
        if gs.finished:
            return
        gs.finished = True
        gs.emit(TokenEvent(-1, -1, self.tier, gs.produced, finish_reason=reason, error=msg))

    # ---- the loop ------------------------------------------------------------------------------
    def after_step(self, cb: Callable[[], None]) -> None:
        """Run cb once the engine's next step has sent its work deeper (at once when it is idle or its step
        runs in a thread). The head's token events are written to the client this way: a batch-1 token's
        step goes out to the next tier before the previous token's event takes the event loop."""
        if self._task is None:
            asyncio.get_running_loop().call_soon(cb)
            return
        self._after.append(cb)
        self._wake.set()

    def _run_after(self) -> None:
        todo, self._after = self._after, []
        for cb in todo:
            cb()

    async def _loop(self) -> None:
        while True:
            chunks = self._schedule()
            if not chunks:
                self._run_after()
                self._wake.clear()
                await self._wake.wait()
                continue
            x, runs = self._inputs(chunks)
            t0 = time.perf_counter()
            k = self._burst_len(chunks)
            inline = not self.conf.offload or x.shape[0] <= self.conf.inline_rows
            if not inline:  # the loop serves the network while the stage runs
                self._run_after()
            try:
                toks = await self._call(inline, self.stage.decode_burst, x, runs, k) if k > 1 else None
                out = await self._call(inline, self.stage.forward, x, runs, self.pool) if toks is None else None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                self._fail(chunks, e)
                continue
            self.stage_s += time.perf_counter() - t0
            if self.conf.step_delay_ms > 0:
                await asyncio.sleep(self.conf.step_delay_ms / 1e3)
            steps = 1 if toks is None else k
            self.counters["steps"] += steps
            self.counters["rows"] += steps * int(x.shape[0])
            if toks is None:
                self._post(chunks, out, t0)
            else:
                self.counters["bursts"] += 1
                self._post_burst(chunks, toks, k, t0)
            self._run_after()
            if inline:  # the stage held the loop: let it serve the network before the next step
                await asyncio.sleep(0)

    @staticmethod
    async def _call(inline: bool, fn, *args):
        """The stage, inline or in a worker thread (the event loop keeps serving meanwhile)."""
        return fn(*args) if inline else await asyncio.to_thread(fn, *args)

    def _burst_len(self, chunks: list[_Chunk]) -> int:
        """Greedy decode steps to run in one burst (Stage.decode_burst): > 1 only on CUDA graphs at the
        last tier, when the batch is every queued item and each is a one-token greedy step of a request
        running here that answers at one of this stage's exits. Bounded by the longest remaining
        request (shorter ones drop what they do not need) and by the pool's positions."""
        stage = self.stage
        if (self.conf.decode_burst < 2 or self.down is not None or getattr(stage, "graphs", None) is None
                or len(chunks) != len(self.queue)):
            return 1
        left, room = 0, self.pool.shape.max_len
        for c in chunks:
            it, gs = c.item, c.item.tag
            if (it.sink != self._gen_result or it.n != 1 or c.take != 1 or it.want not in stage.exits
                    or it.verify is not None or it.draft
                    or not it.sampling.greedy or it.policy.kind != FIXED or not isinstance(gs, GenSeq)):
                return 1
            left = max(left, gs.req.max_tokens - gs.produced)
            room = min(room, c.seq.max_tokens - it.pos)
        return max(1, min(self.conf.decode_burst, left, room))

    def _post_burst(self, chunks: list[_Chunk], toks: list[list[int]], k: int, t0: float) -> None:
        """Hand out a burst's tokens as k steps of results, in order, each through the request's own
        sink (`_gen_result`: emit, stop, submit the next step). A request stops taking tokens when it
        finishes or its exit changed meanwhile (a replan): its positions past what it took are dropped."""
        ms = (time.perf_counter() - t0) * 1e3 / k
        resolved: set[int] = set()
        for i, c in enumerate(chunks):
            s, it, gs = c.seq, c.item, c.item.tag
            want, start, took = it.want, it.pos, 0
            used = self.stage.local(want) + 1        # segments the burst advanced for this sequence
            s.running = False
            while took < k and not it.resolved and it.want == want and not s.closing:
                took += 1
                s.seg_lens = [start + took] * used + s.seg_lens[used:]
                it.done = it.n
                resolved.add(id(it))
                it.resolve(Result(toks[took - 1][i], want, self.tier, length=start + took,
                                  timings={self.tier: ms}, total_ms=ms))
                if gs.finished or gs.next_item is it:
                    break
                it = gs.next_item
        self.queue = deque(q for q in self.queue if id(q) not in resolved)

    def _schedule(self) -> list[_Chunk]:
        """All ready work within the step's budgets: decodes first, then prefill chunks, FIFO."""
        budget, chosen, seen, no_slot = self.conf.max_batch_tokens, [], set(), False
        cap = self.conf.max_batch_seqs
        if self.down is not None and self.conf.micro_batches > 1 and self.stage.has_embedding:  # groups form at the head
            runnable = sum(1 for it in self.queue if not getattr(self.seqs.get(it.seq_id), 'running', True))
            in_flight = sum(1 for s in self.seqs.values() if s.running)
            cap = min(cap, max(1, math.ceil((runnable + in_flight) / self.conf.micro_batches)))
        for item in list(self.queue):
            if budget <= 0 or len(chosen) >= cap:
                break
            s = self.seqs.get(item.seq_id)
            if s is None or s.running or s.id in seen:
                continue
            if item.done == 0 and not self._admit(item, s):
                continue
            if s.slot is None:
                if no_slot:
                    continue
                s.slot = self.pool.alloc()
                if s.slot is None and self._evict_idle():
                    s.slot = self.pool.alloc()
                if s.slot is None:
                    no_slot = True
                    continue
            left = item.n - item.done
            take = min(left, budget)
            chosen.append(_Chunk(item, s, take))
            seen.add(s.id)
            budget -= take
        for c in chosen:
            c.seq.running = True
        chosen.sort(key=lambda c: c.take != 1)  # one-row sequences first (the decode kernel's part)
        return chosen

    def _admit(self, item: Item, s: SeqState) -> bool:
        """Check an item's positions when it starts; refuse it (resolved with an error) or rewind."""
        err = None
        if s.closing:
            err = ("NOT_FOUND", f"sequence {s.id!r} was closed")
        elif item.pos > s.length:
            err = ("FAILED_PRECONDITION", f"positions out of order: tier {self.tier} holds {s.length} positions "
                                          f"of {s.id!r}, got a request starting at {item.pos}; resend from {s.length}")
        elif item.pos + item.n > s.max_tokens:
            err = ("RESOURCE_EXHAUSTED", f"positions up to {item.pos + item.n} exceed the limit of {s.max_tokens}")
        elif time.monotonic() >= item.deadline and not item.must_answer:
            err = ("DEADLINE_EXCEEDED", "deadline passed while queued")
        if err is not None:
            self.queue.remove(item)
            item.resolve(Result(error=err, tier=self.tier, length=s.length))
            return False
        if item.pos < s.length:  # replay / rewind: recompute from there
            s.truncate(item.pos)
            self.counters["replays"] += 1
        return True

    def _inputs(self, chunks: list[_Chunk]) -> tuple[torch.Tensor, list[SeqRun]]:
        xs, runs = [], []
        for c in chunks:
            it, s = c.item, c.seq
            last = it.done + c.take == it.n
            xs.append(it.x[it.done:it.done + c.take])
            c.run = SeqRun(s.slot, it.pos + it.done, c.take, list(s.seg_lens), want=it.want,
                           policy=it.policy, sampling=it.sampling, evaluate=last and not it.fill_only,
                           keep_logits=it.verify is not None or (it.draft and not it.sampling.greedy),
                           tail=it.verify.rows if it.verify is not None else 1)
            runs.append(c.run)
        if self.stage.has_embedding:  # token ids, as lists (the head's own requests) or tensors: one tensor
            flat = []
            for x in xs:
                flat += x if isinstance(x, list) else x.tolist()
            return torch.tensor(flat, dtype=torch.long), runs
        return _rows(xs), runs

    def _fail(self, chunks: list[_Chunk], e: Exception) -> None:
        code = "INVALID_ARGUMENT" if isinstance(e, StageError) else "INTERNAL"
        if code == "INTERNAL":
            log.exception("stage failed at %s", self.tier)
        for c in chunks:
            c.seq.running = False
            c.seq.truncate(c.item.pos)  # the step did not happen; the caller may retry
            if c.item in self.queue:
                self.queue.remove(c.item)
            c.item.resolve(Result(error=(code, f"{type(e).__name__}: {e}"), tier=self.tier, length=c.seq.length))

    def _post(self, chunks: list[_Chunk], out: StageOut, t0: float) -> None:
        now = time.perf_counter()
        deeper: list[tuple[_Chunk, int]] = []
        finished: set[int] = set()
        for k, (c, o) in enumerate(zip(chunks, out.seqs)):
            it, s = c.item, c.seq
            s.seg_lens = c.run.seg_lens
            it.done += c.take
            s.running = False
            if it.done < it.n:
                continue  # more of a long prefill next step (it stays at its place in the queue)
            finished.add(id(it))
            ms = (now - it.arrival) * 1e3
            if it.fill_only or it.want is None:
                it.resolve(Result(tier=self.tier, length=s.length, timings={self.tier: ms}, total_ms=ms))
            elif o.exit is not None and it.verify is not None:
                a, tok = self._check_drafts(it, s, o.logits[o.exit])
                it.resolve(Result(tok, o.exit, self.tier, confidence=o.confidence, length=s.length,
                                  timings={self.tier: ms}, total_ms=ms, drafted=len(it.verify.drafts), accepted=a))
            elif o.exit is not None and it.draft and not it.sampling.greedy:
                p_d = probs(o.logits[o.exit][-1:], it.sampling)[0]
                it.resolve(Result(o.token, o.exit, self.tier, confidence=o.confidence, length=s.length,
                                  timings={self.tier: ms}, total_ms=ms, draft_p=p_d))
            elif o.exit is not None:
                it.resolve(Result(o.token, o.exit, self.tier, confidence=o.confidence, length=s.length,
                                  timings={self.tier: ms}, total_ms=ms))
            else:
                deeper.append((c, k))
        if finished:  # one pass over the queue, not a search per item
            self.queue = deque(it for it in self.queue if id(it) not in finished)
        if deeper:
            self._forward(deeper, out)

    # ---- deeper --------------------------------------------------------------------------------
    def _degrade(self, group: list[tuple[_Chunk, int]], out: StageOut, reason: str) -> None:
        todo = [(c, k) for c, k in group if not c.item.resolved]
        if not todo:
            return
        runs = [c.run for c, _ in group]
        ks = [k for _, k in todo]
        by_k = dict(zip([k for _, k in group], runs))
        answers = self.stage.fallback_tokens(out, ks, _RunsByIndex(by_k))
        now = time.perf_counter()
        self.counters["degraded"] += len(todo)
        for c, k in todo:
            o = answers[k]
            ms = (now - c.item.arrival) * 1e3
            if c.item.verify is not None:  # check the drafts against this tier's deepest exit instead
                fl = getattr(self.stage, "fallback_logits", None)
                logits = fl(out, k) if fl is not None else None
                a, tok = self._check_drafts(c.item, c.seq, logits, o.token)
                c.item.resolve(Result(tok, o.exit, self.tier, True, reason, [], {self.tier: ms}, c.seq.length,
                                      total_ms=ms, drafted=len(c.item.verify.drafts), accepted=a))
                continue
            c.item.resolve(Result(o.token, o.exit, self.tier, True, reason, o.confidence, {self.tier: ms},
                                  c.seq.length, total_ms=ms))

    def _check_drafts(self, it: Item, s: SeqState, logits_nV: torch.Tensor | None, last_token: int = -1) -> tuple[int, int]:
        """Check a verify item's drafts against logits at its last n <= k+1 rows and cut the sequence
        back to the accepted prefix; (accepted, token after them). Drafts before the first of those rows
        are taken as they are: a tier holds fewer rows only where its deepest exit made the drafts.
        logits None (a stage without tail logits): every draft is taken, then `last_token`."""
        v, e = it.verify, it.pos + it.n
        k = len(v.drafts)
        if logits_nV is None:
            a, tok = k, last_token
        else:
            logits_nV = logits_nV[-(k + 1):]
            n = logits_nV.shape[0]
            skip = k + 1 - n
            a, tok = verify_drafts(logits_nV, v.drafts[skip:], it.sampling, e - n,
                                   None if v.draft_p is None else v.draft_p[skip:])
            a += skip
        s.truncate(e - k + a)
        return a, tok

    def _forward(self, group: list[tuple[_Chunk, int]], out: StageOut) -> None:
        if self.down is None:
            self._degrade(group, out, "no next tier configured")
            return
        if time.monotonic() < self._down_bad_until:
            self._degrade(group, out, f"next tier {self.down.tier}: {self._down_error} (retrying in "
                                      f"{self._down_bad_until - time.monotonic():.2f} s)")
            return
        margin = self.conf.deadline_margin_ms / 1e3
        now = time.monotonic()
        live, first = [], math.inf
        for c, k in group:
            c.seq.epoch += 1
            c.seq.running = True
            c.epoch = c.seq.epoch
            left = c.item.deadline - now - margin
            if left <= 0:
                c.seq.running = False
                self._degrade([(c, k)], out, "DEADLINE_EXCEEDED: no time left for the next tier")
                continue
            live.append((c, k))
            first = min(first, left)
        if live:
            timer: list = [None]  # one timer for the group (a TimerHandle per sequence cost a sixth of the
            if math.isfinite(first):  # head tier's loop time at 128 rows a step)
                timer[0] = asyncio.get_running_loop().call_later(first, self._on_deadline, live, out, timer)
            self._spawn(self._send(live, out, timer=timer))

    def _on_deadline(self, group: list[tuple[_Chunk, int]], out: StageOut, timer: list) -> None:
        """The earliest deadline of a group sent deeper passed: the chunks past theirs answer degraded,
        and the timer is set again for the next deadline of the rest."""
        now, margin = time.monotonic(), self.conf.deadline_margin_ms / 1e3
        nxt, late = math.inf, []
        for c, k in group:
            if c.item.resolved:
                continue
            left = c.item.deadline - now - margin
            if left > 1e-3:  # (asyncio fires up to its clock resolution early)
                nxt = min(nxt, left)
                continue
            c.seq.running = False
            late.append((c, k))
        if late:
            self._degrade(late, out, f"next tier {self.down.tier}: DEADLINE_EXCEEDED (no answer in time)")
            self._wake.set()
        timer[0] = (asyncio.get_running_loop().call_later(nxt, self._on_deadline, group, out, timer)
                    if math.isfinite(nxt) else None)

    async def _send(self, group: list[tuple[_Chunk, int]], out: StageOut, retry: bool = True,
                    timer: list | None = None) -> None:
        try:
            await self._send_once(group, out, retry)
        finally:  # an answered group's deadline timer would hold `out` until it fires
            if timer is not None and timer[0] is not None and all(c.item.resolved for c, _ in group):
                timer[0].cancel()

    async def _send_once(self, group: list[tuple[_Chunk, int]], out: StageOut, retry: bool) -> None:
        t_send = time.perf_counter()
        try:
            pieces = self._pieces(group)
            left = max(c.item.deadline for c, _ in group) - time.monotonic() - self.conf.deadline_margin_ms / 1e3
            replies = []
            for msg, final in pieces:
                reply = await self.down.step(msg, timeout=min(left, self.conf.step_timeout_s * 4))
                replies.append((msg, final, reply))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable, timed out, refused: answer from here
            self._down_bad_until = time.monotonic() + self.conf.down_cooldown_s
            self._down_error = _short(e)
            for c, _ in group:
                if c.epoch == c.seq.epoch:
                    c.seq.running = False
            self._degrade(group, out, f"next tier {self.down.tier}: {_short(e)}")
            self._wake.set()
            return
        # the hop's time: the round trip less the sender's own encoding (which waits for this step's
        # kernels: that is this tier's compute, not the network's)
        rtt = (time.perf_counter() - t_send) * 1e3 - sum(r.local_ms for _, _, r in replies)
        resend = []
        for msg, final, reply in replies:
            for sq, res, ck in zip(msg.seqs, reply.results, final):
                c, k = ck
                current = c.epoch == c.seq.epoch
                v = c.item.verify
                if res.ok and not sq.fill_only and v is not None and res.drafted != len(v.drafts):
                    res = Result(error=("INTERNAL", f"a verify of {len(v.drafts)} drafts answered as one of "
                                                    f"{res.drafted}"), tier=reply.tier)
                if res.ok:
                    if v is not None and not sq.fill_only and c.item.resolved:
                        pass  # answered degraded meanwhile (and cut back to its own answer): deeper is rewound later
                    elif current:
                        c.seq.acked = max(c.seq.acked, sq.pos + sq.count) if sq.fill_only else res.length
                        if v is not None and not sq.fill_only:  # cut back to the accepted prefix, as deeper did
                            c.seq.truncate(res.length)
                    if sq.fill_only:
                        continue
                elif res.error[0] == "FAILED_PRECONDITION" and retry and current:
                    c.seq.acked = min(res.length, c.seq.acked)   # it lost (some of) the sequence: resend
                    resend.append((c, k))
                    self.counters["replays"] += 1
                    continue
                if current:
                    c.seq.running = False
                if c.item.resolved or sq.fill_only:
                    continue
                if not res.ok:
                    self._degrade([(c, k)], out, f"next tier {reply.tier}: {res.error[0]}: {res.error[1]}")
                    continue
                ms = (time.perf_counter() - c.item.arrival) * 1e3
                timings = {self.tier: max(0.0, ms - rtt), f"net:{self.tier}->{reply.tier}": max(0.0, rtt - res.total_ms),
                           **res.timings}
                c.item.resolve(Result(res.token, res.exit, res.tier, res.degraded, res.reason,
                                      out.seqs[k].confidence + res.confidence,
                                      timings, c.seq.length, total_ms=ms, drafted=res.drafted, accepted=res.accepted))
        if resend:
            await self._send(resend, out, retry=False)
        self._wake.set()

    def _pieces(self, group: list[tuple[_Chunk, int]]) -> list[tuple[StepMessage, list]]:
        """Messages carrying every forwarded sequence's positions [acked, end), under the size limit;
        a sequence too long for one message goes as fill-only parts before its final part."""
        D = self.stage.cfg.d_model
        per_row = D * self.pool.logs.element_size()
        max_rows = max(1, (self.conf.max_message_bytes - (64 << 10)) // per_row)
        logs = self.pool.logs[self.out_log].view(-1, D)
        S = self.pool.shape.max_len
        now = time.monotonic()
        parts: list[tuple[SeqStep, tuple, list[int]]] = []
        for c, k in group:
            s, it = c.seq, c.item
            start, end = s.acked, s.length
            for a in range(start, end, max_rows):
                b = min(end, a + max_rows)
                fill = b < end
                rows = [s.slot * S + p for p in range(a, b)]
                parts.append((SeqStep(s.id, a, b - a, it.want, it.policy, it.sampling, fill,
                                      max(0.0, (it.deadline - now) * 1e3 - self.conf.deadline_margin_ms),
                                      None if fill else it.verify), (c, k), rows))
        msgs, cur, cur_rows = [], [], 0
        for p in parts:
            if cur and cur_rows + p[0].count > max_rows:
                msgs.append(cur)
                cur, cur_rows = [], 0
            cur.append(p)
            cur_rows += p[0].count
        if cur:
            msgs.append(cur)
        out = []
        for m in msgs:
            if len(m) == 1:  # one sequence: its rows are one run of the log (no index tensor, no gather)
                rows = m[0][2]
                hidden = logs[rows[0]:rows[-1] + 1].clone()
            else:
                hidden = logs.index_select(0, torch.tensor([r for p in m for r in p[2]], device=logs.device))
            out.append((StepMessage([p[0] for p in m], hidden, self.tier), [p[1] for p in m]))
        return out

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> dict:
        now = time.monotonic()
        return {"tier": self.tier, "exits": self.stage.exits, "pool": self.pool.describe(),
                "sequences": len(self.seqs), "resident": sum(1 for s in self.seqs.values() if s.slot is not None),
                "running": len(self.gens), "queued": len(self.queue), **self.counters, "stage_s": self.stage_s,
                "seqs": {s.id: {"length": s.length, "acked": s.acked, "resident": s.slot is not None,
                                "kv_bytes": s.length * self.pool.shape.bytes_per_token(), "idle_s": now - s.last_used}
                         for s in self.seqs.values()}}


class _RunsByIndex:
    """Index -> SeqRun for fallback_tokens, which indexes runs by the stage batch's sequence index."""

    def __init__(self, by_k: dict[int, SeqRun]):
        self.by_k = by_k

    def __getitem__(self, k: int) -> SeqRun:
        return self.by_k[k]


def _rows(xs: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' (n, D) rows as one (N, D) tensor: a view when they lie one after another in one
    buffer -- an upstream message's sequences taken in order, the usual step -- else one copy (cat).
    A deep tier's prefill steps carry MBs of states: the copy was a third of the cloud tier's loop time
    (py-spy, H200 host, nano workload)."""
    x0 = xs[0]
    if len(xs) == 1:
        return x0
    D = x0.shape[1]
    if x0.stride() == (D, 1):
        ptr, end = x0.untyped_storage().data_ptr(), x0.storage_offset() + x0.shape[0] * D
        for x in xs[1:]:
            if (x.storage_offset() != end or x.stride() != (D, 1) or x.dtype != x0.dtype
                    or x.untyped_storage().data_ptr() != ptr):
                break
            end += x.shape[0] * D
        else:
            return x0.as_strided(((end - x0.storage_offset()) // D, D), (D, 1), x0.storage_offset())
    return torch.cat(xs)


def _short(e: Exception) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "DEADLINE_EXCEEDED (no answer in time)"
    if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):  # grpc.aio.AioRpcError
        return f"{e.code().name}: {e.details()}"[:300]
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:300]
