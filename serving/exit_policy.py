"""Exit choice by latency budget: a latency model per exit, and the planner that reads it.

Latency model. A request at exit g costs its first token (prefill of the prompt, queueing and
batching included) and then one inter-token interval per further token:

    request_ms(g, P, n) = first_ms(g, P) + (n - 1) * token_ms(g),
    first_ms(g, P)      = token_ms(g) + prefill_ms_per_token(g) * (P - 1)

Every term is learned from what requests at exit g actually saw through the tier engines (which batch
many requests per step), as an EWMA with weight `alpha` on the newest sample; `calibrate` seeds them at
start-up with a few unloaded requests per exit. An estimate that has not been refreshed for a while
decays back toward that unloaded floor (time constant `stale_s`): after a burst has passed, a deep
exit that looked slow is tried again instead of being shunned for as long as nobody picks it.

Quality: each exit's measured validation loss (lower is better); exits without one rank by depth. The
planner picks the best-quality exit whose predicted request time, times a safety factor, fits the
remaining budget; when none fits it answers from the shallowest exit and flags the request infeasible.
The safety factor starts at 1/margin, then tracks the 90th percentile of recent (actual / predicted)
request times (`score`). During generation `replan` steps down to a shallower exit when the rest of
the request no longer fits at the current one.

Speculation. A request that allows it (relay/speculative.py: the head drafts k tokens with draft exit
g_d, one verify round checks them at target g) has, for g > g_d, a second prediction per exit:

    round_ms(k)     = k * token_ms(g_d) + verify_ms(g_d, g, k),
    verify_ms(k)    = verify_fixed(g_d, g) + k * prefill_ms_per_token(g)   (k+1 rows, k beyond a step's)
    E(k)            = (1 - a^(k+1)) / (1 - a)                              tokens per round
    request_ms      = first_ms(g, P) + (n - 1) * round_ms(k) / E(k)

with a the live per-draft acceptance of the pair (decayed counts of accepted drafts over drafts
judged, i.e. accepted plus first rejections, with a prior of 0.5 worth a few drafts until rounds are
measured) and k the request's cap, or, when adaptive, the k in [1, cap] the head would pick
(relay.speculative.choose_k). `verify_fixed` is learned from the verify rounds of the pair and starts
as token_ms(g). A request that opts in is planned with it at every exit deeper than its draft exit; one
in "auto" mode speculates only where plain decoding does not fit and speculation does; `replan`
counts speculation that goes on (at a shallower exit still deeper than the draft exit).

This file does no I/O and knows nothing of HTTP or gRPC.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from relay.speculative import choose_k, expected_tokens
from relay.work import Speculative

SPEC_PRIOR_ACCEPTANCE = 0.5   # per-draft acceptance assumed for a (draft, target) pair before its rounds ...
SPEC_PRIOR_DRAFTS = 4.0       # ... worth this many judged drafts
SPEC_DECAY = 0.98             # weight of the past in a pair's acceptance counts, per round


@dataclass
class ExitInfo:
    index: int                       # exit index g (0 = shallowest)
    layer: int                       # trunk depth it reads
    tier: str                        # tier that holds it
    val_loss: float | None = None    # measured validation loss (lower is better)


def by_quality(exits: list[ExitInfo]) -> list[ExitInfo]:
    """Best quality first: lowest validation loss; exits without one rank by depth, deepest first."""
    return sorted(exits, key=lambda e: (e.val_loss is None, e.val_loss or 0.0, -e.index))


def _ewma(old: float, new: float, alpha: float, n: int) -> float:
    """EWMA after n earlier samples; the first samples are averaged plainly (weight 1/(n+1)) so a
    start-up guess does not linger."""
    w = max(alpha, 1.0 / (n + 1))
    return (1 - w) * old + w * new


@dataclass
class Estimate:
    """One learned cost (ms): EWMA, its unloaded floor, and when it was last refreshed."""
    value: float
    floor: float = math.inf
    samples: int = 0
    t_last: float = field(default_factory=time.monotonic)

    def observe(self, ms: float, alpha: float, now: float) -> None:
        self.value = _ewma(self.value, ms, alpha, self.samples)
        self.floor = min(self.floor, ms)
        self.samples += 1
        self.t_last = now

    def predict(self, now: float, stale_s: float) -> float:
        if not math.isfinite(self.floor) or self.value <= self.floor:
            return self.value
        return self.floor + (self.value - self.floor) * math.exp(-max(0.0, now - self.t_last) / stale_s)


@dataclass
class ExitCost:
    token_ms: Estimate = field(default_factory=lambda: Estimate(5.0))
    prefill_ms_per_token: Estimate = field(default_factory=lambda: Estimate(0.05))


@dataclass
class PairCost:
    """Speculation from draft exit d to target exit g: decayed acceptance counts and the verify's cost."""
    drafted: float = 0.0                   # drafts checked
    accepted: float = 0.0                  # drafts accepted
    judged: float = 0.0                    # accepted + first rejections: the trials of the per-draft rate
    verify_fixed: Estimate | None = None   # a verify round trip less its k extra rows' prefill term (ms)

    def alpha(self) -> float:
        return (self.accepted + SPEC_PRIOR_ACCEPTANCE * SPEC_PRIOR_DRAFTS) / (self.judged + SPEC_PRIOR_DRAFTS)


@dataclass
class LatencyModel:
    n_exits: int
    alpha: float = 0.2
    stale_s: float = 2.0
    cost: list[ExitCost] = field(default_factory=list)
    pairs: dict[tuple[int, int], PairCost] = field(default_factory=dict)   # (draft, target) -> PairCost

    def __post_init__(self):
        if not self.cost:
            self.cost = [ExitCost() for _ in range(self.n_exits)]

    def observe_token(self, g: int, ms: float, now: float | None = None) -> None:
        self.cost[g].token_ms.observe(ms, self.alpha, time.monotonic() if now is None else now)

    def observe_first(self, g: int, prompt_tokens: int, ms: float, now: float | None = None) -> None:
        c, now = self.cost[g], time.monotonic() if now is None else now
        if prompt_tokens > 1 and c.token_ms.samples:  # the per-token part only once the fixed part is known
            per = max(0.0, ms - c.token_ms.predict(now, self.stale_s)) / (prompt_tokens - 1)
            c.prefill_ms_per_token.observe(per, self.alpha, now)

    def token_ms(self, g: int, now: float | None = None) -> float:
        return self.cost[g].token_ms.predict(time.monotonic() if now is None else now, self.stale_s)

    def first_ms(self, g: int, prompt_tokens: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        c = self.cost[g]
        return c.token_ms.predict(now, self.stale_s) + c.prefill_ms_per_token.predict(now, self.stale_s) * max(
            0, prompt_tokens - 1)

    def prefill_ms_per_token(self, g: int, now: float | None = None) -> float:
        return self.cost[g].prefill_ms_per_token.predict(time.monotonic() if now is None else now, self.stale_s)

    # ---- speculation ------------------------------------------------------------------------------
    def pair(self, draft: int, target: int) -> PairCost:
        return self.pairs.setdefault((draft, target), PairCost())

    def observe_round(self, draft: int, target: int, drafted: int, accepted: int, verify_ms: float | None = None,
                      now: float | None = None) -> None:
        """A verified round: its acceptance, and (when timed) the verify's round trip at the head."""
        p, now = self.pair(draft, target), time.monotonic() if now is None else now
        judged = accepted + (1 if accepted < drafted else 0)
        p.drafted = SPEC_DECAY * p.drafted + drafted
        p.accepted = SPEC_DECAY * p.accepted + accepted
        p.judged = SPEC_DECAY * p.judged + judged
        if verify_ms is not None and drafted > 0:
            fixed = max(0.0, verify_ms - drafted * self.prefill_ms_per_token(target, now))
            if p.verify_fixed is None:
                p.verify_fixed = Estimate(fixed)
            p.verify_fixed.observe(fixed, self.alpha, now)

    def acceptance(self, draft: int, target: int) -> float:
        """Per-draft acceptance rate of the pair: measured, pulled toward the prior while rounds are few."""
        p = self.pairs.get((draft, target))
        return p.alpha() if p is not None else SPEC_PRIOR_ACCEPTANCE

    def verify_ms(self, draft: int, target: int, k: int, now: float | None = None) -> float:
        """One verify round of k drafts: the fixed part (the target's step until measured) + k extra rows."""
        now = time.monotonic() if now is None else now
        p = self.pairs.get((draft, target))
        fixed = p.verify_fixed.predict(now, self.stale_s) if p is not None and p.verify_fixed is not None \
            else self.token_ms(target, now)
        return fixed + k * self.prefill_ms_per_token(target, now)

    def spec_round(self, sp: Speculative, target: int, new_tokens: int,
                   now: float | None = None) -> tuple[int, float, float]:
        """(k, expected tokens per round, predicted ms per token) of speculating toward `target`."""
        now = time.monotonic() if now is None else now
        d = sp.draft_exit
        a, t_draft = self.acceptance(d, target), self.token_ms(d, now)
        t_fixed, t_row = self.verify_ms(d, target, 0, now), self.prefill_ms_per_token(target, now)
        k = choose_k(a, t_draft + t_row, t_fixed, sp.k) if sp.adaptive else sp.k
        k = max(1, min(k, new_tokens - 2))   # the head leaves room for the token the verify adds
        e = expected_tokens(a, k)
        return k, e, (k * t_draft + self.verify_ms(d, target, k, now)) / e


@dataclass
class ExitPlan:
    exit: int
    predicted_ms: float
    infeasible: bool = False
    first_ms: float = 0.0     # predicted first token (prefill) and each later one, to score the plan after
    step_ms: float = 0.0
    draft_exit: int | None = None      # speculative plans: the exit that drafts, ...
    k: int = 0                         # ... drafts per round (the first round's, when adaptive) ...
    tokens_per_round: float = 1.0      # ... and the tokens a round is expected to yield

    @property
    def speculative(self) -> bool:
        return self.draft_exit is not None


class ExitPlanner:
    """Chooses exits. `margin` is the fraction of the budget a prediction may use until enough requests
    have finished; from then on the 90th percentile of recent (actual / predicted) request times."""

    def __init__(self, exits: list[ExitInfo], *, margin: float = 0.85, alpha: float = 0.2, stale_s: float = 2.0,
                 window: int = 64, min_requests: int = 8):
        self.exits = sorted(exits, key=lambda e: e.index)
        self.margin = margin
        self.model = LatencyModel(len(self.exits), alpha=alpha, stale_s=stale_s)
        self.ratios: deque[float] = deque(maxlen=window)
        self.min_requests = min_requests
        self.safety = 1.0 / margin   # predictions are multiplied by this before they are compared
        self.by_quality = by_quality(self.exits)

    def plan_for(self, g: int, prompt_tokens: int, new_tokens: int, infeasible: bool = False) -> ExitPlan:
        """The plan (with its predictions) of running the whole request at exit g."""
        first, step = self.model.first_ms(g, prompt_tokens), self.model.token_ms(g)
        return ExitPlan(g, first + step * max(0, new_tokens - 1), infeasible, first, step)

    def plan_spec(self, g: int, sp: Speculative, prompt_tokens: int, new_tokens: int) -> ExitPlan:
        """The plan of running the whole request at exit g > sp.draft_exit, speculating."""
        k, e, step = self.model.spec_round(sp, g, new_tokens)
        first = self.model.first_ms(g, prompt_tokens)
        return ExitPlan(g, first + step * max(0, new_tokens - 1), False, first, step, sp.draft_exit, k, e)

    def candidates(self, g: int, prompt_tokens: int, new_tokens: int, sp: Speculative | None = None,
                   auto: bool = False) -> list[ExitPlan]:
        """The ways to run exit g, preferred first: plain, speculative (opted in: only that one; in
        "auto" mode: after plain). An exit at or above the draft exit is only ever run plain."""
        if sp is None or g <= sp.draft_exit:
            return [self.plan_for(g, prompt_tokens, new_tokens)]
        spec = self.plan_spec(g, sp, prompt_tokens, new_tokens)
        return [self.plan_for(g, prompt_tokens, new_tokens), spec] if auto else [spec]

    def fits(self, predicted_ms: float, budget_ms: float) -> bool:
        return predicted_ms * self.safety <= budget_ms

    def plan(self, budget_ms: float | None, prompt_tokens: int, new_tokens: int, sp: Speculative | None = None,
             auto: bool = False, exit: int | None = None) -> ExitPlan:
        """Best exit for a whole request given the budget left (None = no budget: best quality), or the
        way to run the fixed `exit`. `sp` (its draft exit resolved) allows speculation, `auto` only where
        plain decoding does not fit."""
        if exit is not None or budget_ms is None:
            g = self.by_quality[0].index if exit is None else exit
            cands = self.candidates(g, prompt_tokens, new_tokens, sp, auto)
            if budget_ms is None:
                return cands[0]
            return next((p for p in cands if self.fits(p.predicted_ms, budget_ms)), cands[0])
        for e in self.by_quality:
            for p in self.candidates(e.index, prompt_tokens, new_tokens, sp, auto):
                if self.fits(p.predicted_ms, budget_ms):
                    return p
        return self.plan_for(self.exits[0].index, prompt_tokens, new_tokens, infeasible=True)

    def step_ms(self, g: int, tokens_left: int, sp: Speculative | None = None) -> float:
        """Predicted ms per further token at exit g: speculating when `sp` drafts below g, else plain."""
        if sp is not None and g > sp.draft_exit:
            return self.model.spec_round(sp, g, tokens_left + 1)[2]
        return self.model.token_ms(g)

    def replan(self, current: int, remaining_ms: float, tokens_left: int,
               sp: Speculative | None = None) -> ExitPlan | None:
        """A shallower exit if the rest of the request no longer fits at `current`; else None. `sp`: the
        speculation the request runs with (it goes on at a shallower exit still above the draft exit)."""
        if tokens_left <= 0 or self.fits(self.step_ms(current, tokens_left, sp) * tokens_left, remaining_ms):
            return None
        for e in self.by_quality:
            if e.index >= current:
                continue
            ms = self.step_ms(e.index, tokens_left, sp) * tokens_left
            if self.fits(ms, remaining_ms):
                return ExitPlan(e.index, ms)
        g = self.exits[0].index
        if g == current:
            return None
        return ExitPlan(g, self.step_ms(g, tokens_left, sp) * tokens_left, infeasible=True)

    def score(self, plan: ExitPlan, tokens: int, actual_ms: float) -> None:
        """A finished request: compare its time with what its admission plan predicted for `tokens`."""
        predicted = plan.first_ms + plan.step_ms * max(0, tokens - 1)
        if tokens <= 0 or predicted <= 0:
            return
        self.ratios.append(actual_ms / predicted)
        if len(self.ratios) >= self.min_requests:
            self.safety = min(4.0, max(1.0, percentile(list(self.ratios), 90)))

    def snapshot(self) -> dict:
        """The current model, for /v1/models and logs."""
        now = time.monotonic()
        m = self.model
        out = {"exits": {str(e.index): {"token_ms": round(m.token_ms(e.index, now), 3),
                                        "prefill_ms_per_token": round(m.prefill_ms_per_token(e.index, now), 4),
                                        "samples": m.cost[e.index].token_ms.samples}
                         for e in self.exits},
               "safety": round(self.safety, 3)}
        if m.pairs:  # fraction of drafts accepted, and what the planner predicts with
            out["speculative_acceptance"] = {f"{d}->{g}": p.accepted / p.drafted
                                             for (d, g), p in m.pairs.items() if p.drafted}
            out["speculative"] = {f"{d}->{g}": {"alpha": round(p.alpha(), 4),
                                                "verify_ms_k1": round(m.verify_ms(d, g, 1, now), 3),
                                                "rounds_measured": p.verify_fixed.samples if p.verify_fixed else 0}
                                  for (d, g), p in m.pairs.items()}
        return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]
