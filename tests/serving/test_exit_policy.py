"""The exit planner on a latency model fed by hand: choice by budget, step-down, infeasible, staleness."""
from __future__ import annotations

from serving.exit_policy import ExitInfo, ExitPlanner

TIERS = ["device", "edge", "cloud"]


def _planner(token_ms=(2.5, 23.5, 104.5), losses=(3.0, 2.5, 2.0), stale_s: float = 2.0) -> ExitPlanner:
    exits = [ExitInfo(g, 2 * (g + 1), t, l) for g, (t, l) in enumerate(zip(TIERS, losses))]
    p = ExitPlanner(exits, margin=0.9, stale_s=stale_s)
    for _ in range(5):
        for g in range(3):
            p.model.observe_token(g, token_ms[g], now=0.0)
            p.model.observe_first(g, 9, token_ms[g] + 8 * 0.1 * (g + 1), now=0.0)
    return p


def test_prediction_is_first_token_plus_token_intervals():
    p = _planner()
    assert abs(p.model.token_ms(2, now=0.0) - 104.5) < 1e-9
    assert abs(p.model.first_ms(1, 9, now=0.0) - (23.5 + 8 * 0.2)) < 1e-9
    plan = p.plan_for(2, 9, 10)
    assert abs(plan.predicted_ms - (plan.first_ms + 9 * plan.step_ms)) < 1e-9


def test_best_quality_that_fits():
    p = _planner()
    assert p.plan(None, 4, 10).exit == 2                       # no budget: best quality
    assert p.plan(50, 4, 10).exit == 0                         # only device fits
    assert p.plan(300, 4, 10).exit == 1                        # edge fits, cloud does not
    assert p.plan(2000, 4, 10).exit == 2
    plan = p.plan(5, 4, 10)
    assert plan.exit == 0 and plan.infeasible                  # nothing fits: shallowest, flagged


def test_quality_comes_from_val_loss_not_depth():
    p = _planner(losses=(3.0, 1.9, 2.0))                       # the middle exit measured best
    assert p.plan(None, 4, 10).exit == 1 and p.plan(5000, 4, 10).exit == 1


def test_replan_steps_down_when_late():
    p = _planner()
    assert p.replan(2, remaining_ms=2000, tokens_left=10) is None
    r = p.replan(2, remaining_ms=300, tokens_left=10)
    assert r is not None and r.exit == 1
    r = p.replan(2, remaining_ms=40, tokens_left=10)
    assert r.exit == 0
    assert p.replan(0, remaining_ms=1, tokens_left=10) is None  # already shallowest


def test_online_update_tracks_slower_exit():
    p = _planner()
    before = p.model.token_ms(2, now=0.0)
    for _ in range(30):
        p.model.observe_token(2, 300.0, now=0.0)
    assert p.model.token_ms(2, now=0.0) > before + 150


def test_stale_estimates_decay_to_the_unloaded_floor():
    # a burst made exit 2 look slow; nobody picks it afterwards, so nothing refreshes it: the estimate
    # must fall back toward what it cost unloaded instead of keeping it shunned
    p = _planner(stale_s=2.0)
    for _ in range(30):
        p.model.observe_token(2, 400.0, now=10.0)
    assert p.model.token_ms(2, now=10.0) > 350
    late = p.model.token_ms(2, now=30.0)                        # 10 time constants later
    assert abs(late - 104.5) < 1.0
    assert p.model.token_ms(2, now=11.0) > p.model.token_ms(2, now=12.0) > late


def test_safety_factor_learns_from_late_requests():
    p = _planner()
    p.model.stale_s = 1e9
    assert p.plan(300, 4, 10).exit == 1
    plan = p.plan_for(1, 4, 10)
    for _ in range(10):
        p.score(plan, 10, plan.predicted_ms * 1.5)   # every request took 1.5x its prediction
    assert abs(p.safety - 1.5) < 1e-6
    assert p.plan(300, 4, 10).exit == 0               # the edge exit no longer fits with 1.5x
    for _ in range(64):
        p.score(plan, 10, plan.predicted_ms * 0.9)   # accurate again: the factor relaxes to 1
    assert p.safety == 1.0 and p.plan(300, 4, 10).exit == 1
