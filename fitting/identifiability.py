"""How well do IsoFLOP runs pin down A and B? The objective profiled over (a, b) = (ln A, ln B).

The paper's A = 403.4289 has ln A = 6.00000026 and B = 2980.958 has ln B = 8.000000004: both are points of
its start grid (a, b in {0.5, 1.0, .., 25}), while alpha, beta, gamma and E ended off-grid. That is what a
fit looks like when L-BFGS never moves a and b (the averaged-Huber failure, see scipy_reference.py).
This file measures what that costs on the paper's own design (`PAPER_DESIGN`: 1-4B parameters, budgets
1e19-1e21, G = 1-4, D = C / 6N):

- `profile_ab`: for every (a, b) on a grid, the objective minimised over the other parameters (one batched
  L-BFGS over all grid points, from each point's best screened starts). Read as a quasi-likelihood at the
  fitted residual scale s = sum psi(r) r / (n - p) (psi = Huber's clamp), 2 (f - f_min) / s is the
  likelihood-ratio statistic: below chi2_2(0.95) = 5.99 the data cannot tell (a, b) from the optimum.
- `frozen_vs_free`: the full fit with a, b free against the fit with a, b frozen at the paper's 6 and 8
  (what the paper's numbers imply), and the derived quantities that matter: alpha, beta, E and the N_opt
  exponent beta / (alpha + beta).
It draws nothing (figures.identifiability does) and reads no files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.stats import chi2

from fitting import lbfgs
from fitting.data import Runs
from fitting.fitter import FitConfig, _screen_lse, _threads, fit
from fitting.laws import PAPER, LawParams, family_law_loss
from fitting.objective import LawData, evaluate, get_law

PAPER_DESIGN = {"budgets": (1e19, 1e20, 1e21), "sizes": (1e9, 2e9, 3e9, 4e9), "G": (1, 2, 3, 4)}
_STARTS = {"e": np.arange(-1.0, 1.01, 0.5), "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
           "gamma": np.arange(0.0, 2.01, 0.5)}   # the paper grid's values of the profiled-out parameters


def paper_design_runs(p: LawParams = PAPER, noise: float = 0.005, seed: int = 0, design: dict | None = None) -> Runs:
    """Every (budget, size, G) of the paper's design with D = C / (6 N); loss = law * exp(noise * normal)."""
    design = design or PAPER_DESIGN
    C, N, G = (a.reshape(-1) for a in np.meshgrid(np.asarray(design["budgets"], dtype=np.float64),
                                                   np.asarray(design["sizes"], dtype=np.float64),
                                                   np.asarray(design["G"], dtype=np.float64), indexing="ij"))
    D = C / (6.0 * N)
    L = family_law_loss(N, D, G, p) * np.exp(noise * np.random.default_rng(seed).standard_normal(len(N)))
    return Runs(loss=L, D=D, N=N, G=G, C=C)


def residual_scale(law, x: np.ndarray, d: LawData, delta: float) -> float:
    """s = sum psi(r) r / (n - p): sigma^2 where Huber is quadratic, delta * mean |r| where it is linear."""
    pred, _ = law.predict(torch.tensor(x[None], dtype=torch.float64), d)
    r = (pred[0] - d.y).numpy()
    return float(np.sum(np.clip(r, -delta, delta) * r) / max(1, d.n - len(x)))


@dataclass
class Profile:
    a: np.ndarray                    # (na,) ln A values
    b: np.ndarray                    # (nb,) ln B values
    f: np.ndarray                    # (na, nb) objective minimised over the other parameters
    params: dict                     # name -> (na, nb): E, alpha, beta, gamma at each point
    f_min: float                     # the free fit's objective (<= f.min())
    ab_free: tuple[float, float]     # the free fit's (a, b)
    scale: float                     # residual scale s of the free fit (0 for noiseless data)
    info: dict = field(default_factory=dict)

    def lr_stat(self) -> np.ndarray:
        """2 (f - f_min) / s: the likelihood-ratio statistic of holding (a, b) there (inf if s == 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.scale > 0, 2.0 * (self.f - self.f_min) / self.scale, np.inf)

    def region(self, level: float = 0.95) -> np.ndarray:
        """(na, nb) bool: (a, b) the data cannot reject at `level` (LR statistic below chi2_2)."""
        return self.lr_stat() <= chi2.ppf(level, 2)

    def n_opt_exponent(self) -> np.ndarray:
        """beta / (alpha + beta) at each point; nan where both exponents sit on their zero bound."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.params["beta"] / (self.params["alpha"] + self.params["beta"])

    def spread(self, level: float = 0.95) -> dict:
        """min and max of each quantity over the (a, b) region the data cannot reject."""
        m = self.region(level)
        q = {**self.params, "N_opt_exponent": self.n_opt_exponent(), "a": np.broadcast_to(self.a[:, None], m.shape),
             "b": np.broadcast_to(self.b[None, :], m.shape)}
        return {k: [float(v[m].min()), float(v[m].max())] for k, v in q.items()} if m.any() else {}


def _best_starts(obj: np.ndarray, keep: int) -> np.ndarray:
    """obj (ne, na, nb, nal, nbe, ng) -> (na, nb, keep, 4) best (e, alpha, beta, gamma) starts per (a, b)."""
    ne, na, nb, nal, nbe, ng = obj.shape
    per = np.moveaxis(obj, 0, 2).reshape(na, nb, -1)               # (na, nb, ne * nal * nbe * ng)
    idx = np.argsort(np.nan_to_num(per, nan=np.inf), axis=-1)[..., :keep]
    e_i, al_i, be_i, g_i = np.unravel_index(idx, (ne, nal, nbe, ng))
    return np.stack([_STARTS["e"][e_i], _STARTS["alpha"][al_i], _STARTS["beta"][be_i], _STARTS["gamma"][g_i]], -1)


def profile_ab(runs: Runs, a_grid: np.ndarray, b_grid: np.ndarray, cfg: FitConfig | None = None,
               keep: int = 3) -> Profile:
    """The family-law objective at each (a, b), minimised over (e, alpha, beta, gamma); see the docstring."""
    cfg = replace(cfg or FitConfig(), fixed={})
    law = get_law("family", gamma_on=cfg.gamma_on)
    d = runs.lawdata()
    with _threads(cfg.threads):
        free = fit("family", d, cfg)
        grid = {"e": _STARTS["e"], "a": np.asarray(a_grid, float), "b": np.asarray(b_grid, float),
                "alpha": _STARTS["alpha"], "beta": _STARTS["beta"], "gamma": _STARTS["gamma"]}
        starts = _best_starts(_screen_lse(law, grid, d, cfg), keep)     # (na, nb, keep, 4)
        na, nb = len(grid["a"]), len(grid["b"])
        AB = np.stack(np.meshgrid(grid["a"], grid["b"], indexing="ij"), -1)          # (na, nb, 2)
        ab_rows = torch.tensor(np.repeat(AB.reshape(-1, 2), keep, 0))                # (R, 2)
        x0 = torch.tensor(starts.reshape(-1, 4))                                     # (R, 4) e, alpha, beta, gamma
        res = lbfgs.minimize(_fun_ab(law, d, ab_rows, cfg.delta), x0, cfg.lbfgs,
                             bounds=_free_bounds(law))
        f, xb = _best_of(res, na, nb, keep)
        f, xb = _polish(law, d, AB, f, xb, cfg)
    params = {"E": np.exp(xb[..., 0]), "alpha": xb[..., 1], "beta": xb[..., 2], "gamma": xb[..., 3]}
    fmin = min(free.objective, float(np.min(f)))
    return Profile(a=grid["a"], b=grid["b"], f=f, params=params, f_min=fmin,
                   ab_free=(float(free.x[1]), float(free.x[2])),
                   scale=residual_scale(law, free.x, d, cfg.delta),
                   info={"n_runs": runs.n, "keep": keep, "rows": int(x0.shape[0]), "free_fit": free.params})


def _best_of(res, na: int, nb: int, k: int):
    """(f (na, nb), x (na, nb, 4)): the best of each point's k rows."""
    f = np.nan_to_num(res.f.numpy().reshape(na, nb, k), nan=np.inf)
    best = f.argmin(-1)
    x = res.x.numpy().reshape(na, nb, k, 4)[np.arange(na)[:, None], np.arange(nb)[None, :], best]
    return f.min(-1), x


def _polish(law, d: LawData, AB: np.ndarray, f: np.ndarray, xb: np.ndarray, cfg: FitConfig):
    """One more pass from each point's own optimum and its four neighbours': a point whose starts all
    fell into a worse local minimum picks up its neighbours' basin, so the profile comes out smooth."""
    na, nb = f.shape
    pad = np.pad(xb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    starts = np.stack([xb, pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]], 2)   # (na, nb, 5, 4)
    ab_rows = torch.tensor(np.repeat(AB.reshape(-1, 2), 5, 0))
    res = lbfgs.minimize(_fun_ab(law, d, ab_rows, cfg.delta), torch.tensor(starts.reshape(-1, 4)), cfg.lbfgs,
                         bounds=_free_bounds(law))
    f2, x2 = _best_of(res, na, nb, 5)
    better = f2 < f
    return np.where(better, f2, f), np.where(better[..., None], x2, xb)


def _free_bounds(law):
    lo, hi = law.bounds()
    keep = [0, 3, 4, 5]                                           # e, alpha, beta, gamma
    return [lo[i] for i in keep], [hi[i] for i in keep]


def _fun_ab(law, d: LawData, ab_rows: torch.Tensor, delta: float):
    """Objective of (e, alpha, beta, gamma) rows with each row's (a, b) held at ab_rows[row]."""
    ones = torch.ones(1, d.n, dtype=torch.float64)

    def fun(x, rows):
        full = torch.cat([x[:, :1], ab_rows[rows], x[:, 1:]], 1)  # (B, 6) e, a, b, alpha, beta, gamma
        f, g = evaluate(law, full, d, ones.expand(len(rows), -1), delta)
        return f, torch.cat([g[:, :1], g[:, 3:]], 1)
    return fun


def _derived(params: dict) -> dict:
    al, be = params["alpha"], params["beta"]
    lnN = (math.log(al) + math.log(params["A"]) - math.log(be) - math.log(params["B"])) / (al + be) \
        + be / (al + be) * math.log(1e21 / 6.0) if al > 0 and be > 0 else math.nan
    return {**params, "N_opt_exponent": be / (al + be) if al + be > 0 else math.nan,
            "N_opt@1e21": math.exp(lnN) if math.isfinite(lnN) else math.nan}


def frozen_vs_free(runs: Runs, a: float = 6.0, b: float = 8.0, cfg: FitConfig | None = None) -> dict:
    """The fit with a, b free against a, b frozen (default: the paper's ln A = 6, ln B = 8): parameters,
    N_opt exponent and N_opt at 1e21 FLOPs, each fit's objective, and the LR statistic of the frozen one."""
    cfg = cfg or FitConfig()
    d = runs.lawdata()
    free = fit("family", d, replace(cfg, fixed={}))
    frozen = fit("family", d, replace(cfg, fixed={"a": a, "b": b}))
    s = residual_scale(get_law("family", gamma_on=cfg.gamma_on), free.x, d, cfg.delta)
    lr = 2.0 * (frozen.objective - free.objective) / s if s > 0 else math.inf
    return {"free": {**_derived(free.params), "objective": free.objective, "warnings": free.warnings},
            "frozen": {**_derived(frozen.params), "objective": frozen.objective, "warnings": frozen.warnings,
                       "fixed": {"a": a, "b": b}},
            "lr_stat": lr, "rejected_at_95": bool(lr > chi2.ppf(0.95, 2)), "n_runs": runs.n}
