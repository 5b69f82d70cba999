"""Synthetic IsoFLOP sweeps drawn from known laws: the ground truth for tests, benchmarks and figures.

A sweep has compute budgets C; at each budget, model sizes N log-spaced around the compute-optimal
N_opt(C), D = C / (6 N), and every granularity G; runs outside N in [1e7, 1e10] or D in [1e8, 1e12]
are dropped (the acceptance ranges). Loss = law * exp(noise * standard normal) (log-normal noise).
This file only generates data; it fits nothing.
"""
from __future__ import annotations

import numpy as np

from fitting.data import Runs
from fitting.laws import (PAPER, PAPER_BRANCH, BranchParams, LawParams, branch_loss, dense_loss, family_law_loss,
                          frontier)

DEFAULT_BUDGETS = (1e17, 3e17, 1e18, 3e18, 1e19, 3e19, 1e20, 3e20, 1e21)


def isoflop_sweep(p: LawParams = PAPER, budgets=DEFAULT_BUDGETS, n_sizes: int = 5, G=(1, 2, 3, 4, 5, 6),
                  span: float = 8.0, noise: float = 0.0, seed: int = 0) -> Runs:
    """IsoFLOP runs of the family law; `span` is the N range (max/min) around N_opt at each budget."""
    rng = np.random.default_rng(seed)
    C = np.asarray(budgets, dtype=np.float64)
    n_opt, _ = frontier(C, p)
    ratios = np.logspace(-0.5, 0.5, n_sizes) ** np.log10(span)      # (n_sizes,) around 1
    N = (n_opt[:, None] * ratios[None, :])                            # (budgets, sizes)
    Cb = np.broadcast_to(C[:, None], N.shape)
    N, Cb = N.reshape(-1), Cb.reshape(-1)
    Gs = np.asarray(G, dtype=np.float64)
    N, Cb, Gv = (np.repeat(N, len(Gs)), np.repeat(Cb, len(Gs)), np.tile(Gs, len(N)))
    D = Cb / (6.0 * N)
    keep = (N >= 1e7) & (N <= 1e10) & (D >= 1e8) & (D <= 1e12)
    N, D, Gv, Cb = N[keep], D[keep], Gv[keep], Cb[keep]
    L = family_law_loss(N, D, Gv, p) * np.exp(noise * rng.standard_normal(len(N)))
    return Runs(loss=L, D=D, N=N, G=Gv, C=Cb)


def branch_sweep(b: BranchParams = PAPER_BRANCH, p: LawParams = PAPER, budgets=DEFAULT_BUDGETS,
                 G=(1, 2, 3, 4, 5, 6), noise: float = 0.0, seed: int = 0) -> Runs:
    """Per-exit rows of compute-optimal families: exit g of G (0-based) has P = g exits before it and
    Q = G - 1 - g after it, size N_opt (g + 1) / G (evenly spaced exits), and L_dense from the dense law."""
    rng = np.random.default_rng(seed)
    P, Q, D, Ld, N, C = ([] for _ in range(6))
    for c in budgets:
        n, d = frontier(c, p)
        for g_count in G:
            for g in range(g_count):
                f = (g + 1) / g_count
                P.append(g), Q.append(g_count - 1 - g), D.append(float(d)), N.append(float(n) * f), C.append(c)
                Ld.append(float(dense_loss(n * f, d, p)))
    P, Q, D, Ld, N, C = (np.asarray(v, dtype=np.float64) for v in (P, Q, D, Ld, N, C))
    L = branch_loss(P, Q, D, Ld, b) * np.exp(noise * rng.standard_normal(len(P)))
    return Runs(loss=L, D=D, N=N, G=P + Q + 1, C=C, P=P, Q=Q, L_dense=Ld)
