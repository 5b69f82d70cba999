"""Identifiability of A and B on the paper's design: the (ln A, ln B) profile and frozen-vs-free fits."""
import numpy as np
import pytest

from fitting.checks import design_problems
from fitting.fitter import FitConfig
from fitting.identifiability import PAPER_DESIGN, frozen_vs_free, paper_design_runs, profile_ab
from fitting.laws import PAPER
from fitting.synthetic import isoflop_sweep


@pytest.fixture(scope="module")
def design_runs():
    """The paper's design (1-4B, 1e19-1e21, G 1-4) drawn from its law with 1 % log-normal noise."""
    return paper_design_runs(noise=0.01, seed=0)


def test_paper_design_is_every_budget_size_and_g(design_runs):
    r = design_runs
    assert r.n == 3 * 4 * 4 and set(np.unique(r.G)) == set(PAPER_DESIGN["G"])
    np.testing.assert_allclose(r.D, r.C / (6 * r.N))
    assert r.N.max() / r.N.min() == 4 and r.D.max() / r.D.min() == pytest.approx(400)


def test_profile_minimum_matches_the_free_fit_and_a_is_far_looser_than_b(design_runs):
    prof = profile_ab(design_runs, np.arange(2.0, 12.01, 1.0), np.arange(7.0, 9.01, 0.25),
                      FitConfig(grid="hoffmann"))
    assert prof.f.shape == (11, 9) and prof.f.min() >= prof.f_min * (1 - 1e-9)
    lr = prof.lr_stat()
    assert lr.min() < 3.0                                              # the grid passes close to the optimum
    sp = prof.spread()
    # a (ln A) spans several units at 95 %, b (ln B) well under one: the N term is what the design misses
    assert sp["a"][1] - sp["a"][0] >= 4.0 and sp["b"][1] - sp["b"][0] <= 0.5
    assert sp["N_opt_exponent"][1] - sp["N_opt_exponent"][0] > 0.2      # and with it the N_opt exponent
    i, j = list(prof.a).index(6.0), list(prof.b).index(8.0)
    assert prof.region()[i, j]                                          # the paper's (6, 8) is not rejected


def test_frozen_at_the_papers_grid_point_fits_as_well_but_moves_alpha_and_e(design_runs):
    res = frozen_vs_free(design_runs, cfg=FitConfig(grid="hoffmann"))
    free, frozen = res["free"], res["frozen"]
    assert frozen["A"] == pytest.approx(np.exp(6.0)) and frozen["B"] == pytest.approx(np.exp(8.0))
    assert not res["rejected_at_95"] and res["lr_stat"] < 5.99
    assert abs(free["alpha"] - frozen["alpha"]) > 0.05 and abs(free["E"] - frozen["E"]) > 0.2
    # N_opt inside the design's range barely moves: the data pin the optimum, not its extrapolation
    assert free["N_opt@1e21"] == pytest.approx(frozen["N_opt@1e21"], rel=0.1)


def test_noiseless_profile_is_sharp_at_the_truth():
    prof = profile_ab(paper_design_runs(noise=0.0), np.array([5.0, 6.0, 7.0]), np.array([7.5, 8.0, 8.5]),
                      FitConfig(grid="hoffmann"))
    assert prof.ab_free == pytest.approx((6.0, 8.0), abs=1e-6)
    assert np.unravel_index(np.argmin(prof.f), prof.f.shape) == (1, 1) and prof.f[1, 1] < 1e-12


def test_design_checks_refuse_what_cannot_be_fit_and_warn_on_weak_designs():
    one_g = isoflop_sweep(G=(3,))
    errors, _ = design_problems("family", one_g)
    assert any("gamma needs runs at >= 2 values of G" in e for e in errors)
    assert design_problems("family", one_g, {"gamma": 0.03})[0] == []  # holding gamma removes the need
    two_n = isoflop_sweep(budgets=(1e19,), n_sizes=2)
    errors, _ = design_problems("dense", two_n)
    assert any("2 distinct N value(s)" in e for e in errors)
    _, warnings = design_problems("family", isoflop_sweep(budgets=(1e19,), n_sizes=5, span=2.0))
    assert any("spans only" in w for w in warnings) and any("one compute budget" in w for w in warnings)
    assert design_problems("family", paper_design_runs(PAPER, noise=0.0)) == ([], [])
