"""Grids of L-BFGS starting points, one named table per law.

A grid is an ordered mapping from a law's log-space parameter name to the values it takes; the starts
are the Cartesian product, in the law's parameter order. Sizes:
  family/paper     alpha, beta, gamma in {0, 0.5, .., 2}; e in {-1, -0.5, .., 1}; a, b in {0.5, 1.0, .., 25}
                   = 5^3 * 5 * 50 * 50 = 1,562,500 starts
  family/hoffmann  the same with a, b in {0, 5, .., 25}            = 22,500 starts
  dense/*          the family grids without gamma (312,500 and 4,500)
  branch/*         one small grid for both names (alpha_P, beta_Q, a; D_d is held fixed, not fitted):
                   alpha_P, beta_Q in {-0.1, -0.05, .., 0.3}; a in {0.25, 0.5, .., 2} = 9 * 9 * 8 = 648
                   (the paper's alpha_P ~ 1e-3 sits inside, not on the edge, because the axis starts below 0)
This file only describes grids; screening and optimising them is `fitter.py`'s job.
"""
from __future__ import annotations

import numpy as np


def _r(lo: float, hi: float, step: float) -> np.ndarray:
    return np.round(np.arange(lo, hi + step / 2, step), 10)


_EXP = _r(0.0, 2.0, 0.5)
_E = _r(-1.0, 1.0, 0.5)
_AB_PAPER = _r(0.5, 25.0, 0.5)
_AB_HOFFMANN = _r(0.0, 25.0, 5.0)

_BRANCH = {"alpha_P": _r(-0.1, 0.3, 0.05), "beta_Q": _r(-0.1, 0.3, 0.05), "a": _r(0.25, 2.0, 0.25)}

GRIDS: dict[tuple[str, str], dict[str, np.ndarray]] = {
    ("family", "paper"): {"e": _E, "a": _AB_PAPER, "b": _AB_PAPER, "alpha": _EXP, "beta": _EXP, "gamma": _EXP},
    ("family", "hoffmann"): {"e": _E, "a": _AB_HOFFMANN, "b": _AB_HOFFMANN, "alpha": _EXP, "beta": _EXP,
                             "gamma": _EXP},
    ("dense", "paper"): {"e": _E, "a": _AB_PAPER, "b": _AB_PAPER, "alpha": _EXP, "beta": _EXP},
    ("dense", "hoffmann"): {"e": _E, "a": _AB_HOFFMANN, "b": _AB_HOFFMANN, "alpha": _EXP, "beta": _EXP},
    ("branch", "paper"): _BRANCH,
    ("branch", "hoffmann"): _BRANCH,
}


def get_grid(law: str, name: str) -> dict[str, np.ndarray]:
    if (law, name) not in GRIDS:
        known = sorted({g for _, g in GRIDS})
        raise ValueError(f"unknown grid {name!r} for law {law!r}; known: {', '.join(known)}")
    return GRIDS[(law, name)]


def grid_size(grid: dict[str, np.ndarray]) -> int:
    return int(np.prod([len(v) for v in grid.values()]))


def grid_points(grid: dict[str, np.ndarray], flat: np.ndarray) -> np.ndarray:
    """Rows of the Cartesian product at the given flat indices (C order): (len(flat), P)."""
    axes = list(grid.values())
    idx = np.unravel_index(np.asarray(flat), [len(v) for v in axes])
    return np.stack([ax[i] for ax, i in zip(axes, idx)], -1)
