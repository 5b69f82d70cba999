"""Exit choice by latency budget: per-tier latency models and the planner that reads them.

Latency model. A step sends n_t new positions to each tier t on the exit's path (the prompt on the first
step; one token later; more when a deeper tier catches up on pending positions). Its predicted time is

    step_ms(g) = sum_{t in path(g)} [decode_ms_t + prefill_ms_per_token_t * (n_t - 1)]
               + sum_{links on path(g)} rtt_ms_link + overhead_ms

where `overhead_ms` is what the tiers do not report (router <-> head round trip, serialisation, event
loop). Each term is an EWMA (weight `alpha` on the newest sample) fed by the per-tier timings of every
step; `calibrate` seeds them from a few warm-up forwards per exit at start-up.

Quality. Each exit's measured validation loss (family.json, lower is better); exits without one rank
by depth. The planner picks the best-quality exit whose predicted request time, times a safety factor,
fits the remaining budget; when none fits it answers from the shallowest exit and flags the request
infeasible. The safety factor starts at 1/margin and then tracks the 90th percentile of recent
(actual / predicted) request times (`score`), so it reflects how wrong the model has been lately (load
swings, other tenants). During generation `replan` steps down to a shallower exit when the rest of the
request, at the current exit, no longer fits the remaining budget. It never steps up: deeper tiers would
have to catch up on every position they skipped.

This file does no I/O and knows nothing of HTTP or gRPC.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ExitInfo:
    index: int                       # exit index g (0 = shallowest)
    layer: int                       # trunk depth it reads
    tier: str                        # tier that holds it
    val_loss: float | None = None    # measured validation loss (lower is better)


@dataclass
class TierCost:
    decode_ms: float = 1.0               # one new position
    prefill_ms_per_token: float = 0.05   # each further position in the same step
    samples: int = 0                     # decode observations
    prefill_samples: int = 0

    def step_ms(self, n: int) -> float:
        return self.decode_ms + self.prefill_ms_per_token * max(0, n - 1)


def _ewma(old: float, new: float, alpha: float, n: int) -> float:
    """EWMA after n earlier samples; the first samples are averaged plainly (weight 1/(n+1)) so a
    start-up guess does not linger."""
    w = max(alpha, 1.0 / (n + 1))
    return (1 - w) * old + w * new


@dataclass
class LatencyModel:
    """Per-tier compute costs, per-link round trips and the router-side overhead, all EWMAs (ms)."""
    tiers: list[str]                                   # chain order, head first
    alpha: float = 0.2
    cost: dict[tuple[str, int], TierCost] = field(default_factory=dict)  # (tier, deepest exit used there)
    links: dict[str, float] = field(default_factory=dict)                # "device->edge" -> ms
    link_samples: dict[str, int] = field(default_factory=dict)
    overhead_ms: float = 0.5
    overhead_samples: int = 0

    def _cost(self, tier: str, g: int) -> TierCost:
        return self.cost.setdefault((tier, g), TierCost())

    def observe(self, work: dict[str, tuple[int, int]], timings: dict[str, float], wall_ms: float) -> None:
        """Fold one step in. work: tier -> (deepest exit run there, positions it processed)."""
        reported = 0.0
        for tier, (g, n) in work.items():
            ms = timings.get(tier)
            if ms is None or n <= 0:
                continue
            reported += ms
            c = self._cost(tier, g)
            if n == 1:
                c.decode_ms = _ewma(c.decode_ms, ms, self.alpha, c.samples)
                c.samples += 1
            elif c.samples:  # the per-token part is only known once the fixed part is
                per = max(0.0, ms - c.decode_ms) / (n - 1)
                c.prefill_ms_per_token = _ewma(c.prefill_ms_per_token, per, self.alpha, c.prefill_samples)
                c.prefill_samples += 1
        for key, ms in timings.items():
            if key.startswith("net:"):
                link = key[4:]
                self.link_samples[link] = k = self.link_samples.get(link, 0)
                self.links[link] = _ewma(self.links.get(link, 0.0), ms, self.alpha, k)
                self.link_samples[link] = k + 1
                reported += ms
        over = max(0.0, wall_ms - reported)
        self.overhead_ms = _ewma(self.overhead_ms, over, self.alpha, self.overhead_samples)
        self.overhead_samples += 1

    def step_ms(self, exit: ExitInfo, work: dict[str, int], exits_by_tier: dict[str, int]) -> float:
        """Predicted wall time of one step to `exit`; work: tier -> positions it must process."""
        path = self.tiers[: self.tiers.index(exit.tier) + 1]
        ms = self.overhead_ms
        for i, tier in enumerate(path):
            g = exit.index if tier == exit.tier else exits_by_tier[tier]
            ms += self._cost(tier, g).step_ms(work.get(tier, 1))
            if i:
                ms += self.links.get(f"{path[i - 1]}->{tier}", 0.0)
        return ms


@dataclass
class Plan:
    exit: int
    predicted_ms: float
    infeasible: bool = False
    first_ms: float = 0.0     # predicted first step (prefill) and each later step, to score the plan after
    step_ms: float = 0.0


class ExitPlanner:
    """Chooses exits. `margin` is the fraction of the budget a prediction may use until enough requests
    have finished; from then on the planner uses the 90th percentile of recent (actual / predicted)
    request times instead, so predictions that run late under load make it more careful, and accurate
    ones let it use more of the budget."""

    def __init__(self, exits: list[ExitInfo], tiers: list[str], *, margin: float = 0.85, alpha: float = 0.2,
                 window: int = 64, min_requests: int = 8):
        self.exits = sorted(exits, key=lambda e: e.index)
        self.tiers = tiers
        self.margin = margin
        self.model = LatencyModel(tiers, alpha=alpha)
        self.ratios: deque[float] = deque(maxlen=window)
        self.min_requests = min_requests
        self.safety = 1.0 / margin   # predictions are multiplied by this before they are compared
        # best quality first: lowest val loss; unknown losses rank by depth, deepest first
        self.by_quality = sorted(self.exits, key=lambda e: (e.val_loss is None, e.val_loss or 0.0, -e.index))
        self.deepest_on = {t: max(e.index for e in self.exits if e.tier == t) for t in {e.tier for e in self.exits}}

    # ---- prediction ----------------------------------------------------------------------------
    def predict_ms(self, g: int, prompt_tokens: int, new_tokens: int) -> float:
        """Whole request at exit g: prefill + first token, then new_tokens - 1 decode steps."""
        e = self.exits[g]
        path = self.tiers[: self.tiers.index(e.tier) + 1]
        first = self.model.step_ms(e, {t: prompt_tokens for t in path}, self.deepest_on)
        rest = self.model.step_ms(e, {}, self.deepest_on) * max(0, new_tokens - 1)
        return first + rest

    def plan_for(self, g: int, prompt_tokens: int, new_tokens: int, infeasible: bool = False) -> Plan:
        """The plan (with its predictions) of running the whole request at exit g."""
        e = self.exits[g]
        path = self.tiers[: self.tiers.index(e.tier) + 1]
        first = self.model.step_ms(e, {t: prompt_tokens for t in path}, self.deepest_on)
        step = self.model.step_ms(e, {}, self.deepest_on)
        return Plan(g, first + step * max(0, new_tokens - 1), infeasible, first, step)

    def decode_ms(self, g: int) -> float:
        return self.model.step_ms(self.exits[g], {}, self.deepest_on)

    # ---- decisions -----------------------------------------------------------------------------
    def plan(self, budget_ms: float | None, prompt_tokens: int, new_tokens: int) -> Plan:
        """Best exit for a whole request given the budget left (None = no budget: best quality)."""
        if budget_ms is None:
            return self.plan_for(self.by_quality[0].index, prompt_tokens, new_tokens)
        for e in self.by_quality:
            p = self.plan_for(e.index, prompt_tokens, new_tokens)
            if p.predicted_ms * self.safety <= budget_ms:
                return p
        return self.plan_for(self.exits[0].index, prompt_tokens, new_tokens, infeasible=True)

    def replan(self, current: int, remaining_ms: float, tokens_left: int) -> Plan | None:
        """A shallower exit if the rest of the request no longer fits at `current`; else None."""
        if tokens_left <= 0 or self.decode_ms(current) * tokens_left * self.safety <= remaining_ms:
            return None
        for e in self.by_quality:
            if e.index >= current:
                continue
            ms = self.decode_ms(e.index) * tokens_left
            if ms * self.safety <= remaining_ms:
                return Plan(e.index, ms)
        g = self.exits[0].index
        if g == current:
            return None
        return Plan(g, self.decode_ms(g) * tokens_left, infeasible=True)

    def observe(self, work: dict[str, tuple[int, int]], timings: dict[str, float], wall_ms: float) -> None:
        self.model.observe(work, timings, wall_ms)

    def score(self, plan: Plan, tokens: int, actual_ms: float) -> None:
        """A finished request: compare its time with what its admission plan predicted for `tokens`."""
        predicted = plan.first_ms + plan.step_ms * max(0, tokens - 1)
        if tokens <= 0 or predicted <= 0:
            return
        self.ratios.append(actual_ms / predicted)
        if len(self.ratios) >= self.min_requests:
            self.safety = min(4.0, max(1.0, percentile(list(self.ratios), 90)))

    def snapshot(self) -> dict:
        """The current model, for /v1/models and logs."""
        return {
            "tiers": {f"{t}@exit{g}": {"decode_ms": round(c.decode_ms, 3),
                                       "prefill_ms_per_token": round(c.prefill_ms_per_token, 4),
                                       "samples": c.samples} for (t, g), c in self.model.cost.items()},
            "links_ms": {k: round(v, 3) for k, v in self.model.links.items()},
            "overhead_ms": round(self.model.overhead_ms, 3),
            "safety": round(self.safety, 3),
        }


def work_for_step(exit: ExitInfo, tiers: list[str], deepest_on: dict[str, int], seen: dict[str, int],
                  end_pos: int) -> dict[str, tuple[int, int]]:
    """tier -> (deepest exit run there, positions it processes) for a step ending at end_pos."""
    path = tiers[: tiers.index(exit.tier) + 1]
    return {t: (exit.index if t == exit.tier else deepest_on[t], end_pos - seen.get(t, 0)) for t in path}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[k]
