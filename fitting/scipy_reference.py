"""The literature's procedure, written plainly: one SciPy L-BFGS-B run per grid start, in a Python loop.

This is the yardstick, not the fitter: tests and `benchmarks/fit_speed.py` compare `fitter.fit`
against it (objective never worse, and the speed ratio), and it reproduces the known failure mode:
with the Huber loss *averaged* over runs and SciPy's default tolerances, the objective and its
gradient are so small at the start that L-BFGS-B stops at once and a, b stay at their start values.
Only the family and dense laws are covered. numpy float64, analytic gradient (same math as objective.py).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from fitting.objective import HUBER_DELTA

TIGHT = {"ftol": 1e-15, "gtol": 1e-11, "maxiter": 2000, "maxfun": 20000}


def objective(x: np.ndarray, lnN, lnD, lnG, y, delta: float = HUBER_DELTA, mean: bool = False):
    """(value, gradient) of the summed (or mean) Huber on log residuals; x = (e, a, b, alpha, beta[, gamma])."""
    e, a, b, al, be = x[:5]
    t = np.stack([np.full_like(lnN, e), a - al * lnN, b - be * lnD])      # (3, n)
    lse = logsumexp(t, axis=0)
    p = np.exp(t - lse)                                                    # softmax weights (3, n)
    pred = lse + (x[5] * lnG if len(x) == 6 else 0.0)
    r = pred - y
    ar = np.abs(r)
    h = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
    hp = np.clip(r, -delta, delta)
    g = [hp @ p[0], hp @ p[1], hp @ p[2], -(hp * p[1]) @ lnN, -(hp * p[2]) @ lnD]
    if len(x) == 6:
        g.append(hp @ lnG)
    g = np.asarray(g)
    scale = 1.0 / len(y) if mean else 1.0
    return h.sum() * scale, g * scale


def fit_loop(x0s: np.ndarray, lnN, lnD, lnG, y, options: dict | None = TIGHT, mean: bool = False):
    """Minimise from every start in turn; returns (x (K, P), f (K,)) with f the *summed* objective.

    options=None uses SciPy's defaults (ftol 2.2e-9, gtol 1e-5, maxiter 15000).
    """
    xs, fs = [], []
    for x0 in x0s:
        r = minimize(objective, x0, args=(lnN, lnD, lnG, y, HUBER_DELTA, mean), jac=True,
                     method="L-BFGS-B", options=dict(options) if options else None)
        xs.append(r.x)
        fs.append(objective(r.x, lnN, lnD, lnG, y)[0])
    return np.asarray(xs), np.asarray(fs)
