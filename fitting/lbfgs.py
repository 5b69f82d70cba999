"""Batched L-BFGS: many independent small problems minimised together as one tensor program.

Every row of `x0` (B, P) is its own problem. One iteration runs the two-loop recursion, an Armijo
backtracking line search and the curvature-pair update for all still-active rows at once; rows leave
the active set when they converge, so late iterations cost only what is left. There is no Python loop
over rows (the loops are over iterations and backtracking halvings, both bounded).

Box bounds (optional, per parameter): a projected L-BFGS. A parameter sitting on a bound with the
gradient pushing outwards is held (its gradient and direction components are zeroed), every trial point
is projected onto the box, and Armijo uses the projected step. With no bound active this is plain L-BFGS.

This file knows nothing about scaling laws: `fun(x, rows)` returns the objective (B',) and its gradient
(B', P) for the rows `rows` of the batch (so a caller can give each row its own data weights). It handles
no constraints other than boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LBFGSConfig:
    max_iter: int = 2000      # iterations per row at most
    history: int = 10         # curvature pairs kept (m)
    gtol: float = 1e-11       # stop when max |grad| <= gtol * max(1, |f|)
    ftol: float = 1e-15       # stop when relative decrease (f_k - f_{k+1}) / max(|f_k|, 1e-300) <= ftol ...
    ftol_patience: int = 3    # ... this many iterations in a row
    stall_window: int = 100   # stop a row whose objective fell by less than stall_rtol (relative) ...
    stall_rtol: float = 1e-10  # ... over the last stall_window iterations: a plateau, not progress
    c1: float = 1e-4          # Armijo constant
    max_backtrack: int = 40   # halvings per line search (2^-40 ~ 1e-12 of the first step)


@dataclass
class LBFGSResult:
    x: torch.Tensor          # (B, P) final points
    f: torch.Tensor          # (B,)  final objective
    grad: torch.Tensor       # (B, P) final gradient
    n_iter: torch.Tensor     # (B,)  iterations taken
    converged: torch.Tensor  # (B,)  bool: stopped by gtol/ftol (not by max_iter, a stall or a failed line search)
    moved: torch.Tensor      # (B,)  bool: the row left its starting point


def _two_loop(g: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """-H g for each row; S, Y (B, m, P) newest first, rho (B, m) with 0 marking an empty slot."""
    q = g.clone()                                                  # (B, P)
    m = S.shape[1]
    alpha = torch.zeros_like(rho)                                  # (B, m)
    for i in range(m):                                             # newest to oldest
        alpha[:, i] = rho[:, i] * (S[:, i] * q).sum(-1)
        q = q - alpha[:, i:i + 1] * Y[:, i]
    sy = (S[:, 0] * Y[:, 0]).sum(-1)
    yy = (Y[:, 0] * Y[:, 0]).sum(-1)
    have = rho[:, 0] > 0
    # H0 = s'y / y'y from the newest pair; before any pair, scale so the first step is at most 1 in inf-norm.
    h0 = torch.where(have, sy / yy.clamp_min(1e-300),
                     1.0 / g.abs().amax(-1).clamp_min(1.0))
    r = h0[:, None] * q
    for i in reversed(range(m)):                                   # oldest to newest
        beta = rho[:, i] * (Y[:, i] * r).sum(-1)
        r = r + (alpha[:, i] - beta)[:, None] * S[:, i]
    return -r


def _held(x: torch.Tensor, g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(B, P) bool: on a bound with the gradient pointing out of the box (descent would leave it)."""
    return ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))


def _line_search(fun: Objective, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, d: torch.Tensor,
                 rows: torch.Tensor, cfg: LBFGSConfig, lo: torch.Tensor, hi: torch.Tensor):
    """Armijo backtracking for every row at once; returns (x_new, f_new, g_new, ok) for `rows`.

    Trial points are projected onto [lo, hi]; Armijo reads f(x_t) <= f + c1 g.(x_t - x).

    The full step t = 1 is tried first; rows that fail it try the next `_FAN` halvings in one call
    (t = 2^-1 .. 2^-8, then 2^-9 .. 2^-16, ...) and keep the largest step that satisfies Armijo, so a
    line search costs at most 1 + max_backtrack / _FAN calls however many rows backtrack. (A quadratic-
    interpolation step before the fan saved ~15 % of evaluations but let rows on flat plateaus creep
    for thousands of iterations; halving lets them fail the search and stop.)
    """
    x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
    ok = torch.zeros_like(f, dtype=torch.bool)
    x1 = torch.minimum(torch.maximum(x + d, lo), hi)               # (b, P)
    ft, gt = fun(x1, rows)
    good = torch.isfinite(ft) & (ft <= f + cfg.c1 * (g * (x1 - x)).sum(-1))
    x_new[good], f_new[good], g_new[good], ok[good] = x1[good], ft[good], gt[good], True
    todo = torch.nonzero(~good).squeeze(1)
    k0 = 1
    while len(todo) and k0 <= cfg.max_backtrack:
        ks = torch.arange(k0, min(k0 + _FAN, cfg.max_backtrack + 1), dtype=x.dtype)
        t = 0.5 ** ks                                              # (k,)
        xt = x[todo, None] + t[None, :, None] * d[todo, None]      # (b', k, P)
        xt = torch.minimum(torch.maximum(xt, lo), hi)
        b, k, P = xt.shape
        ft, gt = fun(xt.reshape(b * k, P), rows[todo].repeat_interleave(k))
        ft, gt = ft.reshape(b, k), gt.reshape(b, k, P)
        decrease = (g[todo, None] * (xt - x[todo, None])).sum(-1)  # (b', k) g.(x_t - x)
        armijo = torch.isfinite(ft) & (ft <= f[todo, None] + cfg.c1 * decrease)  # (b', k)
        hit = armijo.any(1)
        first = armijo.float().argmax(1)                           # largest accepted step
        acc, j = todo[hit], first[hit]
        x_new[acc] = xt[hit, j]
        f_new[acc], g_new[acc], ok[acc] = ft[hit, j], gt[hit, j], True
        todo = todo[~hit]
        k0 += _FAN
    return x_new, f_new, g_new, ok


_FAN = 8


def minimize(fun: Objective, x0: torch.Tensor, cfg: LBFGSConfig | None = None,
             progress: Callable[[int, int], None] | None = None,
             bounds: tuple[list[float], list[float]] | None = None) -> LBFGSResult:
    """Minimise every row of x0 (B, P) independently within `bounds` = (lower, upper) per parameter
    (None: unbounded); x0 is projected onto the box first. See the module docstring."""
    cfg = cfg or LBFGSConfig()
    B, P = x0.shape
    inf = torch.full((P,), torch.inf, dtype=x0.dtype)
    lo, hi = (-inf, inf) if bounds is None else (torch.tensor(b, dtype=x0.dtype) for b in bounds)
    x0 = torch.minimum(torch.maximum(x0, lo), hi)
    x = x0.clone()
    all_rows = torch.arange(B)
    f, g = fun(x, all_rows)
    S = torch.zeros(B, cfg.history, P, dtype=x.dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(B, cfg.history, dtype=x.dtype)
    n_iter = torch.zeros(B, dtype=torch.long)
    stall = torch.zeros(B, dtype=torch.long)
    converged = torch.zeros(B, dtype=torch.bool)
    active = all_rows[torch.isfinite(f)]
    f_ref = f.clone()                                              # objective stall_window iterations ago
    for it in range(cfg.max_iter):
        if it and it % cfg.stall_window == 0:
            plateau = (f_ref[active] - f[active]) <= cfg.stall_rtol * f_ref[active].abs()
            active = active[~plateau]
            f_ref[active] = f[active]
        held = _held(x[active], g[active], lo, hi)                # (b, P) parameters pinned at a bound
        pg = g[active].masked_fill(held, 0.0)                      # projected gradient
        gmax = pg.abs().amax(-1)
        done = gmax <= cfg.gtol * f[active].abs().clamp_min(1.0)
        converged[active[done]] = True
        active = active[~done]
        if len(active) == 0:
            break
        a = active
        pg, held = pg[~done], held[~done]
        d = _two_loop(pg, S[a], Y[a], rho[a]).masked_fill(held, 0.0)
        bad = (pg * d).sum(-1) >= 0                                # not a descent direction: restart
        if bad.any():
            d[bad] = -pg[bad] / pg[bad].abs().amax(-1, keepdim=True).clamp_min(1.0)
            rho[a[bad]] = 0.0
        x_new, f_new, g_new, ok = _line_search(fun, x[a], f[a], g[a], d, a, cfg, lo, hi)
        s, y = x_new - x[a], g_new - g[a]
        sy = (s * y).sum(-1)
        upd = ok & (sy > 1e-300)
        u = a[upd]
        S[u] = torch.roll(S[u], 1, dims=1)
        Y[u] = torch.roll(Y[u], 1, dims=1)
        rho[u] = torch.roll(rho[u], 1, dims=1)
        S[u, 0], Y[u, 0], rho[u, 0] = s[upd], y[upd], 1.0 / sy[upd]
        rel = (f[a] - f_new) / f[a].abs().clamp_min(1e-300)
        stall[a] = torch.where(rel <= cfg.ftol, stall[a] + 1, torch.zeros_like(stall[a]))
        x[a], f[a], g[a] = x_new, f_new, g_new
        n_iter[a] += 1
        # A failed line search means no representable decrease along d: as converged as float64 allows
        # (counted as converged only when the row was also stalling on ftol).
        stop = ~ok | (stall[a] >= cfg.ftol_patience)
        converged[a[stop & (stall[a] >= cfg.ftol_patience)]] = True
        converged[a[~ok]] = converged[a[~ok]] | (rel[~ok] <= cfg.ftol)
        active = a[~stop]
        if progress is not None:
            progress(it + 1, len(active))
        if len(active) == 0:
            break
    moved = (x - x0).abs().amax(-1) > 0
    return LBFGSResult(x=x, f=f, grad=g, n_iter=n_iter, converged=converged, moved=moved)
