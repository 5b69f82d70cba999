"""The exit planner with speculation, on a latency model fed by hand: the predicted request time of a
speculative request, and the choice it makes possible (a budget that only speculation fits buys the
deep exit; a pair whose drafts are rejected does not)."""
from __future__ import annotations

import pytest

from relay.work import Speculative
from serving.exit_policy import SPEC_PRIOR_ACCEPTANCE, ExitInfo, ExitPlanner

TIERS = ["device", "edge", "cloud"]
TOKEN_MS = (2.5, 23.5, 104.5)     # a device exit, an edge one a link away, a cloud one further
PREFILL_MS = (0.1, 0.2, 0.3)      # per further position in a step


def _planner() -> ExitPlanner:
    exits = [ExitInfo(g, 2 * (g + 1), t, l) for g, (t, l) in enumerate(zip(TIERS, (3.0, 2.5, 2.0)))]
    p = ExitPlanner(exits, margin=0.9)
    for _ in range(5):
        for g in range(3):
            p.model.observe_token(g, TOKEN_MS[g], now=0.0)
            p.model.observe_first(g, 9, TOKEN_MS[g] + 8 * PREFILL_MS[g], now=0.0)
    return p


def _rounds(p: ExitPlanner, accepted: int, k: int = 4, n: int = 40, verify_ms: float | None = None) -> None:
    for _ in range(n):
        p.model.observe_round(0, 2, k, accepted, verify_ms, now=0.0)


def e_tokens(a: float, k: int) -> float:
    return (1 - a ** (k + 1)) / (1 - a)


def test_prediction_is_rounds_of_drafts_and_one_verify():
    p = _planner()
    sp = Speculative(0, 4, adaptive=False)
    plan = p.plan_spec(2, sp, 4, 10)
    # before any round: acceptance is the prior, the verify is the target's step plus k extra rows
    e = e_tokens(SPEC_PRIOR_ACCEPTANCE, 4)
    round_ms = 4 * TOKEN_MS[0] + TOKEN_MS[2] + 4 * PREFILL_MS[2]
    first = TOKEN_MS[2] + 3 * PREFILL_MS[2]
    assert plan.speculative and plan.draft_exit == 0 and plan.k == 4
    assert plan.tokens_per_round == pytest.approx(e)
    assert plan.first_ms == pytest.approx(first, rel=1e-6)
    assert plan.step_ms == pytest.approx(round_ms / e, rel=1e-6)
    assert plan.predicted_ms == pytest.approx(first + 9 * round_ms / e, rel=1e-6)


def test_measured_rounds_set_acceptance_and_verify_cost():
    p = _planner()
    _rounds(p, accepted=3, verify_ms=150.0)         # 3 of 4 accepted: 4 drafts judged per round
    a = p.model.acceptance(0, 2)
    assert 0.74 < a < 0.76                          # 3/4, the prior's weight decayed away
    assert p.model.verify_ms(0, 2, 4, now=0.0) == pytest.approx(150.0)
    assert p.model.verify_ms(0, 2, 1, now=0.0) == pytest.approx(150.0 - 3 * PREFILL_MS[2])
    plan = p.plan_spec(2, Speculative(0, 4, adaptive=False), 4, 10)
    assert plan.tokens_per_round == pytest.approx(e_tokens(a, 4))
    assert plan.step_ms == pytest.approx((4 * TOKEN_MS[0] + 150.0) / e_tokens(a, 4), rel=1e-3)
    snap = p.snapshot()
    assert snap["speculative_acceptance"]["0->2"] == pytest.approx(0.75)
    assert snap["speculative"]["0->2"]["rounds_measured"] == 40


def test_adaptive_k_is_the_one_the_head_would_pick():
    p = _planner()
    _rounds(p, accepted=8, k=8)                     # every draft accepted: longer rounds pay
    plan = p.plan_spec(2, Speculative(0, 8, adaptive=True), 4, 32)
    assert plan.k == 8 and plan.tokens_per_round > 6
    _rounds(p, accepted=0, k=8, n=200)              # every draft rejected: one draft a round
    assert p.plan_spec(2, Speculative(0, 8, adaptive=True), 4, 32).k == 1


def test_a_budget_only_speculation_fits_buys_the_deep_exit():
    p = _planner()
    _rounds(p, accepted=4)                          # acceptance near 1: ~5 tokens per round
    sp = Speculative(0, 4, adaptive=False)
    budget = 500.0                                  # plain: exit 1 fits (~236 ms), exit 2 does not (~1046 ms)
    assert p.plan(budget, 4, 10).exit == 1
    for auto in (False, True):
        plan = p.plan(budget, 4, 10, sp, auto=auto)
        assert plan.exit == 2 and plan.speculative and plan.predicted_ms * p.safety <= budget
    # opted in, speculation is planned wherever the exit is deeper than the draft exit ...
    assert p.plan(None, 4, 10, sp).speculative
    # ... while "auto" decodes plainly where that fits
    plan = p.plan(5000.0, 4, 10, sp, auto=True)
    assert plan.exit == 2 and not plan.speculative


def test_without_acceptance_it_falls_back():
    p = _planner()
    _rounds(p, accepted=0, n=200)                   # drafts always rejected: a round yields one token
    sp = Speculative(0, 4, adaptive=False)
    plan = p.plan(500.0, 4, 10, sp, auto=True)
    assert plan.exit == 1 and not plan.speculative
    plan = p.plan(20.0, 4, 10, sp, auto=True)       # nothing fits: the shallowest, flagged
    assert plan.exit == 0 and plan.infeasible and not plan.speculative


def test_fixed_exit_auto_speculates_only_when_plain_does_not_fit():
    p = _planner()
    _rounds(p, accepted=4)
    sp = Speculative(0, 4, adaptive=False)
    assert not p.plan(5000.0, 4, 10, sp, auto=True, exit=2).speculative
    assert p.plan(500.0, 4, 10, sp, auto=True, exit=2).speculative
    assert not p.plan(500.0, 4, 10, None, exit=2).speculative       # the plain plan, over budget or not
    assert not p.plan(500.0, 4, 10, sp, auto=True, exit=0).speculative  # the draft exit itself


def test_replan_counts_speculation_that_goes_on():
    p = _planner()
    _rounds(p, accepted=4)
    sp = Speculative(0, 4, adaptive=False)
    assert p.replan(2, remaining_ms=300, tokens_left=10) is not None       # plain exit 2 is late ...
    assert p.replan(2, remaining_ms=300, tokens_left=10, sp=sp) is None    # ... speculating it is not
    assert p.replan(2, remaining_ms=220, tokens_left=10).exit == 0         # plain exit 1 does not fit ...
    r = p.replan(2, remaining_ms=220, tokens_left=10, sp=sp)
    assert r is not None and r.exit == 1                                   # ... exit 1 still speculating does
    assert p.replan(2, remaining_ms=20, tokens_left=10, sp=sp).exit == 0
