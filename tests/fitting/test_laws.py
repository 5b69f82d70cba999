"""The laws: closed forms against brute force, EL definitions and their limits."""
import math

import numpy as np
import pytest

from fitting.laws import (PAPER, PAPER_BRANCH, branch_loss, dense_loss, dense_set_loss, efficiency_leverage,
                          efficiency_leverage_compute, family_loss, frontier, frontier_numeric, n_opt_exponent,
                          optimal_loss)


def test_family_law_is_dense_law_times_granularity_penalty():
    N, D = 3e8, 1e10
    for G in (1, 2, 6):
        assert family_loss(N, D, G) == pytest.approx(dense_loss(N, D) * G ** PAPER.gamma, rel=1e-15)
    assert dense_loss(N, D) == pytest.approx(PAPER.E + PAPER.A / N ** PAPER.alpha + PAPER.B / D ** PAPER.beta)


@pytest.mark.parametrize("C", [1e18, 1e20, 1e22])
def test_closed_form_frontier_is_the_minimum_on_the_isoflop_line(C):
    N_opt, D_opt = frontier(C)
    assert 6 * N_opt * D_opt == pytest.approx(C, rel=1e-12)
    N = N_opt * np.logspace(-2, 2, 40001)
    brute = N[np.argmin(family_loss(N, C / (6 * N), 4))]
    assert brute == pytest.approx(N_opt, rel=2e-4)


def test_frontier_scales_with_the_chinchilla_exponent():
    C = np.array([1e19, 1e21])
    N, _ = frontier(C)
    assert math.log(N[1] / N[0]) / math.log(100) == pytest.approx(n_opt_exponent(PAPER), rel=1e-12)


def test_numeric_frontier_matches_closed_form_for_six_n_d():
    C = np.array([1e18, 1e20, 1e22])
    Nc, Dc = frontier(C)
    Nn, Dn = frontier_numeric(C, PAPER, lambda N: 6.0 * N, G=3)
    np.testing.assert_allclose(Nn, Nc, rtol=1e-6)
    np.testing.assert_allclose(Dn, Dc, rtol=1e-6)


def test_numeric_frontier_shrinks_n_when_extra_flops_grow_with_n():
    # a FLOP count with a superlinear term (attention-like) must push N_opt below the 6ND optimum
    C = 1e20
    Nn, _ = frontier_numeric(C, PAPER, lambda N: 6.0 * N + 2e-4 * N ** 1.5)
    assert Nn < frontier(C)[0]


def test_dense_set_spends_exactly_the_budget_on_frontier_models():
    C, G = 1e20, 4
    f = np.arange(1, G + 1) / G
    r = (PAPER.alpha + PAPER.beta) / PAPER.beta
    Cg = C * f ** r / np.sum(f ** r)
    assert Cg.sum() == pytest.approx(C)
    Ng, _ = frontier(Cg)
    np.testing.assert_allclose(Ng / Ng[-1], f, rtol=1e-12)            # sizes keep the exits' ratios
    assert dense_set_loss(C, G) == pytest.approx(np.mean(optimal_loss(Cg, PAPER.replace(gamma=0.0))))


def test_efficiency_leverage_definitions_and_trend():
    C = np.array([1e19, 1e20, 1e21])
    for G in (3, 4, 5, 6):
        el = efficiency_leverage(C, G)
        assert np.all(el > 1.0) and np.all(np.diff(el) < 0)            # paper: EL > 1, largest at low C
        assert el[0] == pytest.approx(dense_set_loss(C[0], G) / optimal_loss(C[0], PAPER, G))
        elc = efficiency_leverage_compute(C, G)
        assert np.all(elc > 1.0)
        # the compute form's C_dense really reaches the family's loss
        assert dense_set_loss(elc[1] * C[1], G) == pytest.approx(optimal_loss(C[1], PAPER, G), rel=1e-10)
    assert efficiency_leverage(1e19, 1) == pytest.approx(1.0)          # G = 1: the dense set is the model


def test_compute_form_is_infinite_below_the_dense_floor():
    p = PAPER.replace(gamma=-0.5)                                      # family below E: unreachable
    assert math.isinf(float(efficiency_leverage_compute(1e30, 4, p)))


def test_branch_law_reduces_to_dense_when_neutral():
    b = PAPER_BRANCH
    assert branch_loss(0, 1.0, 1e30, 2.5, b) == pytest.approx(2.5 * b.a, rel=1e-12)
    # upstream branches barely matter (alpha_P ~ 1e-3); shallow exits pay Q^-beta_Q
    assert branch_loss(5, 1.0, 1e10, 2.5) / branch_loss(0, 1.0, 1e10, 2.5) == pytest.approx(6 ** 1e-3)
    assert branch_loss(0, 0.25, 1e10, 2.5) / branch_loss(0, 1.0, 1e10, 2.5) == pytest.approx(4 ** 0.04)


def test_bad_exit_fractions_are_refused():
    with pytest.raises(ValueError, match="exit fractions"):
        efficiency_leverage(1e20, 3, exit_fractions=[0.5, 0.2, 1.0])
