"""Efficiency Leverage (EL): the family's average exit loss against independent dense models of the exits'
sizes, at the same training budget C.

Family side (all definitions): L_family(C) = L(N_opt(C), D_opt(C), G), the family law at its compute-optimal
point for C = k N D (k = 6), under whichever G^gamma reading `p.gamma_on` names.

Dense side: G dense models, model g of N_g = f_g N_opt parameters (f_g = l_g / L, default g / G). The paper
says only "size-matched dense models ... with matched parameter count and compute", which admits three
readings (`DENSE_SIDES`):
  "matched"       (default; the paper's words read literally) each dense model gets the family's whole
                  budget C:                 D_g = C / (k N_g)
  "same-tokens"   each dense model gets the tokens the family saw, i.e. the compute its exit's own
                  sub-network spent (k N_g D):  D_g = D_opt
  "budget-split"  (this project's first definition) G compute-optimal dense models that together spend C:
                  C_g = C f_g^r / sum_h f_h^r, r = (alpha+beta)/beta, each at N_opt(C_g)
L_dense(C) is the mean of their dense-law losses.

Two forms: `efficiency_leverage` = L_dense(C) / L_family(C) (> 1: the family is the better buy) and
`efficiency_leverage_compute` = how many times the dense side's training compute must grow (sizes kept;
for "budget-split", the budget re-split) for its mean loss to reach L_family(C); inf when unreachable.
This file only evaluates laws; it fits nothing and draws nothing.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.optimize import brentq

from fitting.laws import K_CHINCHILLA, PAPER, LawParams, dense_loss, frontier, optimal_loss

DENSE_SIDES = ("matched", "same-tokens", "budget-split")


def _exit_fractions(G: int, fractions: Sequence[float] | None) -> np.ndarray:
    f = np.arange(1, G + 1) / G if fractions is None else np.asarray(fractions, dtype=np.float64)
    if len(f) != G or not np.all((f > 0) & (f <= 1)) or not np.all(np.diff(f) > 0) or f[-1] != 1.0:
        raise ValueError(f"exit fractions must be G={G} increasing values in (0, 1] ending at 1, got {list(f)}")
    return f


def _check_side(dense_side: str) -> None:
    if dense_side not in DENSE_SIDES:
        raise ValueError(f"dense_side must be one of {DENSE_SIDES}, got {dense_side!r}")


def budget_split_loss(C, G: int, p: LawParams = PAPER, k: float = K_CHINCHILLA,
                      exit_fractions: Sequence[float] | None = None, scale=1.0):
    """Mean loss of G compute-optimal dense models of the exits' relative sizes that share scale * C.

    With N_opt ∝ C^(beta/(alpha+beta)), N_g ∝ f_g fixes the split C_g = C f_g^r / sum_h f_h^r."""
    f = _exit_fractions(G, exit_fractions)
    r = (p.alpha + p.beta) / p.beta
    share = f ** r / np.sum(f ** r)                                          # (G,)
    C = np.asarray(C, dtype=np.float64) * scale
    return optimal_loss(C[..., None] * share, p.replace(gamma=0.0), 1, k).mean(-1)


def dense_side_loss(C, G: int, p: LawParams = PAPER, dense_side: str = "matched", k: float = K_CHINCHILLA,
                    exit_fractions: Sequence[float] | None = None, scale=1.0):
    """Mean dense-law loss of the G size-matched dense models at budget C (see the module docstring);
    `scale` multiplies every dense model's training tokens (the compute form's unknown)."""
    _check_side(dense_side)
    if dense_side == "budget-split":
        return budget_split_loss(C, G, p, k, exit_fractions, scale)
    f = _exit_fractions(G, exit_fractions)
    N, D = frontier(np.asarray(C, dtype=np.float64), p, k)
    Ng = N[..., None] * f                                                    # (..., G)
    Dg = (N[..., None] / Ng) * D[..., None] if dense_side == "matched" else D[..., None] + 0 * Ng
    return dense_loss(Ng, Dg * scale, p).mean(-1)


def efficiency_leverage(C, G: int, p: LawParams = PAPER, dense_side: str = "matched",
                        k: float = K_CHINCHILLA, exit_fractions: Sequence[float] | None = None):
    """EL (loss form) = L_dense(C) / L_family(C); > 1 when the family is the better buy."""
    return dense_side_loss(C, G, p, dense_side, k, exit_fractions) / optimal_loss(C, p, G, k)


def efficiency_leverage_compute(C, G: int, p: LawParams = PAPER, dense_side: str = "matched",
                                k: float = K_CHINCHILLA, exit_fractions: Sequence[float] | None = None):
    """EL (compute form): the factor s on the dense side's training compute at which its mean loss equals
    L_family(C) (sizes kept; "budget-split" re-splits s C). inf when the dense floor E is above L_family."""
    Cs = np.atleast_1d(np.asarray(C, dtype=np.float64))
    out = np.empty_like(Cs)
    for i, c in enumerate(Cs):
        target = math.log(float(optimal_loss(c, p, G, k)))
        if target <= math.log(p.E) + 1e-12:
            out[i] = math.inf
            continue
        h = lambda ls: math.log(float(dense_side_loss(c, G, p, dense_side, k, exit_fractions, math.exp(ls)))) - target
        lo, hi = -20.0, 20.0
        while h(hi) > 0:
            hi += 20.0
        while h(lo) < 0:
            lo -= 20.0
        out[i] = math.exp(brentq(h, lo, hi, xtol=1e-12, rtol=1e-14))
    return out.reshape(np.shape(C))


def crossing_budget(G: int, p: LawParams = PAPER, dense_side: str = "matched", lo: float = 1e15,
                    hi: float = 1e32) -> float | None:
    """The budget C in [lo, hi] where EL (loss form) crosses 1, or None when it stays on one side."""
    h = lambda lc: float(efficiency_leverage(10.0 ** lc, G, p, dense_side)) - 1.0
    a, b = math.log10(lo), math.log10(hi)
    grid = np.linspace(a, b, 69)
    vals = [h(x) for x in grid]
    for x0, x1, v0, v1 in zip(grid, grid[1:], vals, vals[1:]):
        if v0 == 0 or v0 * v1 < 0:
            return 10.0 ** brentq(h, x0, x1, xtol=1e-10)
    return None
