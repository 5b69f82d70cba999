"""The laws: closed forms against brute force, both G^gamma readings, the branch law and its unit."""
import math

import numpy as np
import pytest

from fitting.laws import (PAPER, PAPER_BRANCH, BranchParams, branch_loss, dense_loss, family_law_loss, frontier,
                          frontier_numeric, n_opt_exponent, PAPER_B_TYPO)


def test_family_law_is_dense_law_times_granularity_penalty():
    N, D = 3e8, 1e10
    for G in (1, 2, 6):
        assert family_law_loss(N, D, G) == pytest.approx(dense_loss(N, D) * G ** PAPER.gamma, rel=1e-15)
    assert dense_loss(N, D) == pytest.approx(PAPER.E + PAPER.A / N ** PAPER.alpha + PAPER.B / D ** PAPER.beta)


def test_learnable_reading_scales_only_the_reducible_part():
    """Eq. (1): L -> E G^gamma at large N, D; the text's reading: L -> E (G^gamma acts on A, B terms only)."""
    q = PAPER.replace(gamma_on="learnable")
    N, D, G = 3e8, 1e10, 4
    reducible = dense_loss(N, D) - PAPER.E
    assert family_law_loss(N, D, G, q) == pytest.approx(PAPER.E + reducible * G ** PAPER.gamma, rel=1e-15)
    assert family_law_loss(N, D, 1, q) == pytest.approx(dense_loss(N, D), rel=1e-15)
    assert family_law_loss(1e30, 1e30, G) == pytest.approx(PAPER.E * G ** PAPER.gamma, rel=1e-6)
    assert family_law_loss(1e30, 1e30, G, q) == pytest.approx(PAPER.E, rel=1e-6)
    for p in (PAPER, q):                                             # neither reading moves the optimum
        N_opt, _ = frontier(1e20, p)
        Ns = N_opt * np.logspace(-1, 1, 20001)
        assert Ns[np.argmin(family_law_loss(Ns, 1e20 / (6 * Ns), G, p))] == pytest.approx(N_opt, rel=2e-4)
    with pytest.raises(ValueError, match="gamma_on"):
        PAPER.replace(gamma_on="both")


@pytest.mark.parametrize("C", [1e18, 1e20, 1e22])
def test_closed_form_frontier_is_the_minimum_on_the_isoflop_line(C):
    N_opt, D_opt = frontier(C)
    assert 6 * N_opt * D_opt == pytest.approx(C, rel=1e-12)
    N = N_opt * np.logspace(-2, 2, 40001)
    brute = N[np.argmin(family_law_loss(N, C / (6 * N), 4))]
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


def test_branch_law_is_the_dense_loss_plus_a_fading_penalty():
    b = PAPER_BRANCH
    assert branch_loss(0, 0, 1e10, 2.5) == 2.5                        # a dense model: no branch points
    # L = L_dense + (alpha_P P + beta_Q Q) (D_d / D)^a with D in thousands of tokens, written out once
    P, Q, D = 2, 3, 4e9
    assert branch_loss(P, Q, D, 2.5) == pytest.approx(2.5 + (1e-3 * 2 + 0.0397 * 3) * (2.75e6 / 4e6) ** 0.5734,
                                                      rel=1e-14)
    # exits before cost ~40x less than exits after (alpha_P ~ 1e-3 against beta_Q ~ 0.04)
    pen = lambda P, Q: branch_loss(P, Q, 1e10, 2.5) - 2.5
    assert pen(1, 0) / pen(0, 1) == pytest.approx(b.alpha_P / b.beta_Q)
    # the penalty falls as D^-a, and it is additive in P and Q
    assert pen(0, 1) / (branch_loss(0, 1, 1e11, 2.5) - 2.5) == pytest.approx(10 ** b.a)
    assert pen(2, 3) == pytest.approx(2 * pen(1, 0) + 3 * pen(0, 1))
    # only alpha_P D_d^a, beta_Q D_d^a and a are identifiable: rescaling D_d with them changes nothing
    b2 = BranchParams(alpha_P=b.alpha_P * 4 ** -b.a, beta_Q=b.beta_Q * 4 ** -b.a, D_d=4 * b.D_d, a=b.a,
                      D_unit=b.D_unit)
    assert branch_loss(3, 2, 1e9, 2.5, b2) == pytest.approx(branch_loss(3, 2, 1e9, 2.5, b), rel=1e-14)
    # the unit only rescales D_d: D_d = 2.75e6 thousand tokens is D_d = 2.75e9 tokens
    b3 = BranchParams(alpha_P=b.alpha_P, beta_Q=b.beta_Q, D_d=b.D_d * 1e3, a=b.a, D_unit=1.0)
    assert branch_loss(3, 2, 1e9, 2.5, b3) == pytest.approx(branch_loss(3, 2, 1e9, 2.5, b), rel=1e-14)


def test_branch_unit_thousand_tokens_gives_visible_penalties_on_the_papers_design():
    """In tokens the penalty is below 0.3 % of the loss over the paper's D (1-4B params at 1e19-1e21, so
    D = 4e8..1.7e11); in thousands of tokens it spans 0.4-13 %; in millions it exceeds the loss."""
    D = np.array([1e19 / (6 * 4e9), 1e21 / (6 * 1e9)])                 # the design's smallest and largest D
    L = 2.8
    pen = {}
    for unit in (1.0, 1e3, 1e6):
        b = BranchParams(alpha_P=1e-3, beta_Q=0.0397, D_d=2.75e6, a=0.5734, D_unit=unit)
        pen[unit] = (branch_loss(0, 3, D, L, b) - L) / L                # first exit of a G = 4 family
    assert pen[1.0].max() < 0.003                                       # invisible, below run-to-run noise
    assert 0.003 < pen[1e3].min() and pen[1e3].max() < 0.15             # visible, below the loss
    assert pen[1e6].max() > 1.0                                         # larger than the loss itself


def test_presets_are_the_papers_constants():
    assert PAPER.as_dict() == {"E": 1.0059, "A": 403.4289, "alpha": 0.2982, "B": 2980.958, "beta": 0.3412,
                               "gamma": 0.0333}
    assert PAPER_BRANCH.as_dict() == {"alpha_P": 1e-3, "beta_Q": 0.0397, "D_d": 2.75e6, "a": 0.5734}
    assert "2512.23407" in PAPER.source and "stand-in" not in PAPER.source + PAPER_BRANCH.source
    assert PAPER.gamma_on == "equation" and PAPER.n_kind == "total" and PAPER_BRANCH.D_unit == 1e3
    # A and B sit on start-grid points (ln A = 6, ln B = 8); the paper's other printing of B is a typo
    assert math.log(PAPER.A) == pytest.approx(6.0, abs=1e-6) and math.log(PAPER.B) == pytest.approx(8.0, abs=1e-8)
    assert abs(math.log(PAPER_B_TYPO) - 8.0) > 3e-4
