"""The exit planner on a latency model fed by hand: choice by budget, step-down, infeasible, cost."""
from __future__ import annotations

import time

from serving.exit_policy import ExitInfo, ExitPlanner, work_for_step

TIERS = ["device", "edge", "cloud"]


def _planner(decode=(2.0, 20.0, 80.0), link=1.0, losses=(3.0, 2.5, 2.0)) -> ExitPlanner:
    exits = [ExitInfo(g, 2 * (g + 1), t, l) for g, (t, l) in enumerate(zip(TIERS, losses))]
    p = ExitPlanner(exits, TIERS, margin=0.9)
    for _ in range(5):
        for g, e in enumerate(exits):
            seen = {}
            timings = {t: decode[i] for i, t in enumerate(TIERS[: g + 1])}
            timings.update({f"net:{a}->{b}": link for a, b in zip(TIERS[:g], TIERS[1: g + 1])})
            w = work_for_step(e, TIERS, {t: i for i, t in enumerate(TIERS)}, seen, 1)
            p.observe(w, timings, sum(timings.values()) + 0.5)
    return p


def test_prediction_adds_tiers_links_and_overhead():
    p = _planner()
    assert abs(p.decode_ms(0) - 2.5) < 1e-6
    assert abs(p.decode_ms(1) - (2 + 20 + 1 + 0.5)) < 1e-6
    assert abs(p.decode_ms(2) - (2 + 20 + 80 + 2 + 0.5)) < 1e-6
    assert abs(p.predict_ms(2, 1, 10) - 10 * p.decode_ms(2)) < 1e-6


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


def test_online_update_tracks_slower_tier():
    p = _planner()
    before = p.decode_ms(2)
    e = p.exits[2]
    for _ in range(30):
        p.observe(work_for_step(e, TIERS, {t: i for i, t in enumerate(TIERS)}, {}, 1),
                  {"device": 2, "edge": 20, "cloud": 200, "net:device->edge": 1, "net:edge->cloud": 1}, 224.5)
    assert p.decode_ms(2) > before + 100


def test_decision_cost_under_200_us():
    p = _planner()
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        p.plan(100 + i % 900, 16, 32)
    per_us = (time.perf_counter() - t0) / n * 1e6
    assert per_us < 200, per_us


def test_safety_factor_learns_from_late_requests():
    p = _planner()
    assert p.plan(300, 4, 10).exit == 1
    plan = p.plan_for(1, 4, 10)
    for _ in range(10):
        p.score(plan, 10, plan.predicted_ms * 1.5)   # every request took 1.5x its prediction
    assert abs(p.safety - 1.5) < 1e-6
    assert p.plan(300, 4, 10).exit == 0               # the edge exit no longer fits with 1.5x
    for _ in range(64):
        p.score(plan, 10, plan.predicted_ms * 0.9)   # accurate again: the factor relaxes to 1
    assert p.safety == 1.0 and p.plan(300, 4, 10).exit == 1
