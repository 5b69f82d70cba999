"""The laws: closed forms against brute force, EL definitions and their limits."""
import math

import numpy as np
import pytest

from fitting.laws import (PAPER, PAPER_BRANCH, BranchParams, branch_loss, dense_loss, dense_set_loss,
                          efficiency_leverage, efficiency_leverage_compute, family_loss, frontier, frontier_numeric,
                          n_opt_exponent, optimal_loss)


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


def test_branch_law_is_the_dense_loss_plus_a_fading_penalty():
    b = PAPER_BRANCH
    assert branch_loss(0, 0, 1e10, 2.5) == 2.5                        # a dense model: no branch points
    # L = L_dense + (alpha_P P + beta_Q Q) (D_d / D)^a, written out once
    P, Q, D = 2, 3, 4e9
    assert branch_loss(P, Q, D, 2.5) == pytest.approx(2.5 + (1e-3 * 2 + 0.0397 * 3) * (2.75e6 / 4e9) ** 0.5734,
                                                      rel=1e-14)
    # exits before cost ~40x less than exits after (alpha_P ~ 1e-3 against beta_Q ~ 0.04)
    pen = lambda P, Q: branch_loss(P, Q, 1e10, 2.5) - 2.5
    assert pen(1, 0) / pen(0, 1) == pytest.approx(b.alpha_P / b.beta_Q)
    # the penalty falls as D^-a, and it is additive in P and Q
    assert pen(0, 1) / (branch_loss(0, 1, 1e11, 2.5) - 2.5) == pytest.approx(10 ** b.a)
    assert pen(2, 3) == pytest.approx(2 * pen(1, 0) + 3 * pen(0, 1))
    # only alpha_P D_d^a, beta_Q D_d^a and a are identifiable: rescaling D_d with them changes nothing
    b2 = BranchParams(alpha_P=b.alpha_P * 4 ** -b.a, beta_Q=b.beta_Q * 4 ** -b.a, D_d=4 * b.D_d, a=b.a)
    assert branch_loss(3, 2, 1e9, 2.5, b2) == pytest.approx(branch_loss(3, 2, 1e9, 2.5, b), rel=1e-14)


def test_presets_are_the_papers_constants():
    assert PAPER.as_dict() == {"E": 1.0059, "A": 403.4289, "alpha": 0.2982, "B": 2980.958, "beta": 0.3412,
                               "gamma": 0.0333}
    assert PAPER_BRANCH.as_dict() == {"alpha_P": 1e-3, "beta_Q": 0.0397, "D_d": 2.75e6, "a": 0.5734}
    assert "2512.23407" in PAPER.source and "stand-in" not in PAPER.source + PAPER_BRANCH.source


def test_bad_exit_fractions_are_refused():
    with pytest.raises(ValueError, match="exit fractions"):
        efficiency_leverage(1e20, 3, exit_fractions=[0.5, 0.2, 1.0])
