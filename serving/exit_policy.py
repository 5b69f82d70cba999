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

This file does no I/O and knows nothing of HTTP or gRPC.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field


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
class LatencyModel:
    n_exits: int
    alpha: float = 0.2
    stale_s: float = 2.0
    cost: list[ExitCost] = field(default_factory=list)

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


@dataclass
class ExitPlan:
    exit: int
    predicted_ms: float
    infeasible: bool = False
    first_ms: float = 0.0     # predicted first token (prefill) and each later one, to score the plan after
    step_ms: float = 0.0


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

    def plan(self, budget_ms: float | None, prompt_tokens: int, new_tokens: int) -> ExitPlan:
        """Best exit for a whole request given the budget left (None = no budget: best quality)."""
        if budget_ms is None:
            return self.plan_for(self.by_quality[0].index, prompt_tokens, new_tokens)
        for e in self.by_quality:
            p = self.plan_for(e.index, prompt_tokens, new_tokens)
            if p.predicted_ms * self.safety <= budget_ms:
                return p
        return self.plan_for(self.exits[0].index, prompt_tokens, new_tokens, infeasible=True)

    def replan(self, current: int, remaining_ms: float, tokens_left: int) -> ExitPlan | None:
        """A shallower exit if the rest of the request no longer fits at `current`; else None."""
        if tokens_left <= 0 or self.model.token_ms(current) * tokens_left * self.safety <= remaining_ms:
            return None
        for e in self.by_quality:
            if e.index >= current:
                continue
            ms = self.model.token_ms(e.index) * tokens_left
            if ms * self.safety <= remaining_ms:
                return ExitPlan(e.index, ms)
        g = self.exits[0].index
        if g == current:
            return None
        return ExitPlan(g, self.model.token_ms(g) * tokens_left, infeasible=True)

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
        return {"exits": {str(e.index): {"token_ms": round(self.model.token_ms(e.index, now), 3),
                                         "prefill_ms_per_token": round(self.model.cost[e.index].prefill_ms_per_token
                                                                       .predict(now, self.model.stale_s), 4),
                                         "samples": self.model.cost[e.index].token_ms.samples}
                          for e in self.exits},
                "safety": round(self.safety, 3)}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]
