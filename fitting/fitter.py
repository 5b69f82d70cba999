"""The fitter: screen a grid of starts, run batched L-BFGS on the promising ones, keep the lowest objective.

Procedure (the paper's, vectorised):
1. Screen: evaluate the objective (Huber(1e-3) on log residuals, summed) at every grid start. For the
   family/dense laws this exploits the law's structure: exp(a - alpha ln N) and exp(b - beta ln D) are
   tabulated once per (a, alpha) and (b, beta), so the 1.56M-start paper grid costs one log per
   (e, a, b, alpha, beta) cell and run, in float32 (screening only ranks starts).
2. Prune: keep the `keep` best starts overall plus the `per_cell` best of every exponent cell (alpha,
   beta, gamma), so every exponent region gets optimised even if its best start looks poor at first.
3. Optimise the kept starts together with batched L-BFGS in float64 (analytic gradients, gtol 1e-11,
   ftol 1e-15) and return the lowest objective. `keep=None` optimises every start (no pruning); the
   tests check that pruning returns the same optimum as no pruning on a grid where both are affordable.
Bootstrap replicates and leave-one-budget-out folds are extra batch rows with their own data weights,
so they are re-optimised in one batched L-BFGS run too. The branch law is fitted the same way (generic
screen, then batched L-BFGS) over (alpha_P, beta_Q, a) with D_d held at `FitConfig.branch_D_d`.
Every parameter is box-bounded (objective.BOUNDS); an optimum on a bound is reported as a warning, since it
means the runs do not determine that parameter. `FitConfig.fixed` freezes parameters (e.g. a = 6, b = 8 as
the paper's A, B suggest); the grid then collapses to the fixed value on those axes.

Data loading is `data.py`; the laws' numpy forms are `laws.py`; drawing is `figures.py`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from fitting import lbfgs
from fitting.grids import get_grid, grid_points, grid_size
from fitting.laws import PAPER_BRANCH
from fitting.objective import HUBER_DELTA, Frozen, Law, LawData, evaluate, get_law, huber

_CELL_AXES = {"family": ("alpha", "beta", "gamma"), "dense": ("alpha", "beta"), "branch": ("alpha_P", "beta_Q")}
_N_CANDIDATES = 8     # starts reused by bootstrap replicates and validation folds


@dataclass
class FitConfig:
    grid: str | dict = "paper"          # start grid name (see grids.py) or {param: values} in law order
    keep: int | None = 256              # best screened starts optimised; None = every start
    per_cell: int = 1                   # plus this many best starts of every exponent cell
    delta: float = HUBER_DELTA          # Huber threshold on log residuals
    lbfgs: lbfgs.LBFGSConfig = field(default_factory=lbfgs.LBFGSConfig)
    chunk: int = 4_000_000              # elements per screening block (memory bound)
    max_batch: int = 1024               # L-BFGS rows per batched block
    progress: bool = False              # tqdm bars on stderr
    branch_D_d: float = PAPER_BRANCH.D_d  # branch law: D_d held fixed (not identifiable next to alpha_P,
                                        # beta_Q; only alpha_P D_d^a, beta_Q D_d^a and a are)
    threads: int | None = 1             # torch intra-op threads while fitting (None = leave as is); the
                                        # batch is many small ops, where a second thread gains little and
                                        # oversubscribed cores (a busy CI box) slow it down 5-10x
    gamma_on: str = "equation"          # family law: G^gamma on everything (eq. (1)) or "learnable" (A, B terms)
    fixed: dict = field(default_factory=dict)  # parameters held fixed: log-space (e, a, b, ...) or E, A, B
    branch_D_unit: float = PAPER_BRANCH.D_unit  # branch law: tokens per unit of D (and of D_d)


_NATURAL_TO_LOG = {"E": "e", "A": "a", "B": "b"}


def log_fixed(law_name: str, fixed: dict) -> dict:
    """`fixed` with natural names (E, A, B) turned into the log-space ones (e, a, b) the law optimises."""
    out = {}
    for k, v in fixed.items():
        if k in _NATURAL_TO_LOG and law_name in ("family", "dense"):
            if not v > 0:
                raise ValueError(f"{k} must be positive to be fixed, got {v}")
            out[_NATURAL_TO_LOG[k]] = math.log(v)
        else:
            out[k] = float(v)
    return out


def make_law(law_name: str, cfg: "FitConfig") -> Law:
    """The law object `cfg` describes: G^gamma reading, branch D_d and unit, frozen parameters."""
    return get_law(law_name, cfg.branch_D_d, cfg.gamma_on, log_fixed(law_name, cfg.fixed), cfg.branch_D_unit)


@dataclass
class FitResult:
    law: str
    grid: str
    x: np.ndarray                       # (P,) best point, log-space parameters
    params: dict                        # published names: E, A, alpha, B, beta[, gamma] / alpha_P, beta_Q, D_d, a
    fixed: dict                         # constants held fixed, not fitted (branch: D_d, D_unit; any frozen)
    objective: float                    # summed Huber at x
    n_runs: int
    n_starts: int                       # grid size
    n_optimised: int                    # starts given to L-BFGS after pruning
    n_converged: int
    n_in_basin: int                     # optimised starts that reached the best objective (rel 1e-9, abs 1e-20)
    n_unmoved: int                      # optimised starts L-BFGS never moved
    seconds: dict
    warnings: list[str]
    candidates: np.ndarray              # (M, P) starts reused by bootstrap / validation
    finals: np.ndarray = field(repr=False, default=None)      # (K, P) every optimised start's end point
    finals_f: np.ndarray = field(repr=False, default=None)    # (K,)

    def summary(self) -> dict:
        return {"law": self.law, "grid": self.grid, "params": self.params, "fixed": self.fixed,
                "objective": self.objective,
                "n_runs": self.n_runs, "n_starts": self.n_starts, "n_optimised": self.n_optimised,
                "n_converged": self.n_converged, "n_in_basin": self.n_in_basin,
                "n_unmoved": self.n_unmoved, "seconds": self.seconds, "warnings": self.warnings}


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- screening -----------------------------------------------------------------------------------
def _screen_lse(law: Law, grid: dict, d: LawData, cfg: FitConfig) -> np.ndarray:
    """Objective at every family/dense grid start, shape = the grid's axis lengths (C order)."""
    f32 = torch.float32
    e, a, b = (torch.tensor(grid[k], dtype=f32) for k in ("e", "a", "b"))
    al, be = torch.tensor(grid["alpha"], dtype=f32), torch.tensor(grid["beta"], dtype=f32)
    ga = torch.tensor(grid["gamma"], dtype=f32) if law.name == "family" else torch.zeros(1, dtype=f32)
    learnable = law.name == "family" and law.gamma_on == "learnable"
    lnN, lnD, lnG, y = (v.to(f32) for v in (d.lnN, d.lnD, d.lnG, d.y))
    X1 = (a[:, None, None] - al[None, :, None] * lnN).exp()       # (na, nal, n)
    X2 = (b[:, None, None] - be[None, :, None] * lnD).exp()       # (nb, nbe, n)
    E = e.exp()[:, None, None, None, None, None]
    Gg = (ga[:, None] * lnG).exp()                                 # (ng, n) G^gamma
    shift = ga[:, None] * lnG - y                                  # (ng, n)
    out = torch.empty(len(e), len(a), len(b), len(al), len(be), len(ga), dtype=torch.float64)
    per_a = len(e) * len(b) * len(al) * len(be) * len(ga) * d.n
    step = max(1, cfg.chunk // per_a)
    blocks = range(0, len(a), step)
    for i in tqdm(blocks, desc="screen", disable=not cfg.progress, leave=False):
        x1 = X1[i:i + step]                                        # (ca, nal, n)
        # S[e, ca, b, alpha, beta, n] = X1[ca, alpha] + X2[b, beta]: the learnable part
        s = x1[None, :, None, :, None, :] + X2[None, None, :, None, :, :]   # (1, ca, nb, nal, nbe, n)
        lp = None if learnable else (E + s).log_()                 # (ne, ca, nb, nal, nbe, n)
        for j in range(len(ga)):
            # equation: gamma only shifts the log prediction; learnable: log(E + G^gamma s) per gamma
            r = ((lp + shift[j]) if lp is not None else (E + s * Gg[j]).log_().sub_(y)).abs_()
            m = r.clamp(max=cfg.delta)
            # Huber(r) = m (|r| - m / 2) with m = min(|r|, delta): the exact two-piece form
            out[:, i:i + step, ..., j] = r.sub_(m.mul_(0.5)).mul_(m.mul_(2.0)).sum(-1).double()
    if law.name == "dense":
        out = out[..., 0]
    return out.numpy()


def _screen_generic(law: Law, grid: dict, d: LawData, cfg: FitConfig) -> np.ndarray:
    total = grid_size(grid)
    out = np.empty(total)
    step = max(1, cfg.chunk // d.n)
    ones = torch.ones(1, d.n, dtype=torch.float64)
    for s in tqdm(range(0, total, step), desc="screen", disable=not cfg.progress, leave=False):
        x = torch.tensor(grid_points(grid, np.arange(s, min(total, s + step))))
        pred, _ = law.predict(x, d)
        out[s:s + step] = (ones * huber(pred - d.y, cfg.delta)).sum(-1).numpy()
    return out.reshape([len(v) for v in grid.values()])


def screen(law: Law, grid: dict, d: LawData, cfg: FitConfig) -> np.ndarray:
    """Objective at every start of `grid` (array shaped like the grid; `law` is never a Frozen one)."""
    if law.name in ("family", "dense"):
        return _screen_lse(law, grid, d, cfg)
    return _screen_generic(law, grid, d, cfg)


def select_starts(obj: np.ndarray, grid: dict, law: str, keep: int | None, per_cell: int) -> np.ndarray:
    """Flat indices of the starts to optimise: `keep` best overall + `per_cell` best per exponent cell."""
    flat = np.nan_to_num(obj.reshape(-1), nan=np.inf)
    if keep is None or keep >= flat.size:
        return np.arange(flat.size)
    best = np.argpartition(flat, keep - 1)[:keep]
    names = list(grid)
    cell_axes = [names.index(c) for c in _CELL_AXES[law]]
    moved = np.moveaxis(obj, cell_axes, range(len(cell_axes)))     # (cells..., rest...)
    n_cells = int(np.prod(moved.shape[:len(cell_axes)]))
    per = moved.reshape(n_cells, -1)                               # (cells, rest)
    k = min(per_cell, per.shape[1])
    top = np.argpartition(np.nan_to_num(per, nan=np.inf), k - 1, axis=1)[:, :k]  # (cells, k)
    # back to flat indices of the original layout
    cell_idx = np.unravel_index(np.repeat(np.arange(n_cells), k), moved.shape[:len(cell_axes)])
    rest_idx = np.unravel_index(top.reshape(-1), moved.shape[len(cell_axes):])
    full = [None] * obj.ndim
    for ax, v in zip(cell_axes, cell_idx):
        full[ax] = v
    rest_axes = [i for i in range(obj.ndim) if i not in cell_axes]
    for ax, v in zip(rest_axes, rest_idx):
        full[ax] = v
    per_cell_flat = np.ravel_multi_index(full, obj.shape)
    return np.unique(np.concatenate([best, per_cell_flat]))


# ---- optimisation --------------------------------------------------------------------------------
def optimise(law: Law, d: LawData, x0: np.ndarray, W: torch.Tensor, group: int, cfg: FitConfig,
             desc: str = "L-BFGS") -> lbfgs.LBFGSResult:
    """Batched L-BFGS from x0 (R, P); row r uses data weights W[r // group] (W: (R/group, n)).

    Rows go through in blocks of `cfg.max_batch`: each block is one batched problem; blocks keep the
    (rows, runs) temporaries cache-sized (one 22,500-row block runs ~3x slower than 1,024-row blocks).
    """
    bar = tqdm(total=len(x0), desc=desc, unit="start", disable=not cfg.progress, leave=False)
    parts = []
    for s in range(0, len(x0), cfg.max_batch):
        offset = s

        def fun(x, rows, offset=offset):
            return evaluate(law, x, d, W[(rows + offset) // group], cfg.delta)

        def progress(it, n_active, done=s, size=min(cfg.max_batch, len(x0) - s)):
            bar.set_postfix(iter=it, refresh=False)
            bar.update(done + size - n_active - bar.n)  # redraws at most every mininterval (0.1 s)

        parts.append(lbfgs.minimize(fun, torch.tensor(x0[s:s + cfg.max_batch], dtype=torch.float64),
                                    cfg.lbfgs, progress, law.bounds()))
    bar.close()
    return lbfgs.LBFGSResult(*(torch.cat([getattr(p, f) for p in parts]) for f in
                               ("x", "f", "grad", "n_iter", "converged", "moved")))


def _candidates(x_final: np.ndarray, f_final: np.ndarray, x0: np.ndarray, f0: np.ndarray) -> np.ndarray:
    """Up to 4 distinct end points (best first) plus the best screened starts: (M, P)."""
    order = np.argsort(f_final)
    distinct = []
    for i in order:
        if not np.isfinite(f_final[i]):
            break
        if all(np.abs(x_final[i] - x_final[j]).max() > 1e-4 for j in distinct):
            distinct.append(i)
        if len(distinct) == 4:
            break
    rest = x0[np.argsort(f0)[:_N_CANDIDATES - len(distinct)]]
    return np.concatenate([x_final[distinct], rest], 0)


def _warnings(law: Law, grid: dict, x: np.ndarray, winner_moved: bool, n_unmoved: int,
              converged: bool) -> list[str]:
    out = []
    blo, bhi = law.bounds()
    for name, v, lo_b, hi_b in zip(law.names, x, blo, bhi):
        if min(v - lo_b, hi_b - v) <= 5e-3 * (hi_b - lo_b):
            out.append(f"optimum {name}={v:.6g} sits on its bound [{lo_b:g}, {hi_b:g}]: the runs do not "
                       f"determine it")
            continue
        lo, hi = float(grid[name].min()), float(grid[name].max())
        tol = 1e-2 * (hi - lo)
        if hi == lo:
            continue
        if v < lo - tol or v > hi + tol:
            out.append(f"optimum {name}={v:.6g} lies outside the grid range [{lo:g}, {hi:g}]")
        elif min(abs(v - lo), abs(v - hi)) <= tol:
            out.append(f"optimum {name}={v:.6g} sits on the grid boundary [{lo:g}, {hi:g}]")
    if not winner_moved:
        out.append("the winning start never moved: L-BFGS stopped at its starting point")
    if n_unmoved:
        out.append(f"{n_unmoved} optimised start(s) never moved from their starting point")
    if not converged:
        out.append("the best start stopped on the iteration limit, not on a tolerance")
    return out


def fit(law_name: str, d: LawData, cfg: FitConfig | None = None) -> FitResult:
    """Fit `law_name` ('family' | 'dense' | 'branch') to the runs in d; see the module docstring."""
    cfg = cfg or FitConfig()
    with _threads(cfg.threads):
        return _fit(law_name, d, cfg)


def _grid_for(law: Law, law_name: str, cfg: FitConfig) -> tuple[Law, dict]:
    """(the unfrozen law, its start grid with every frozen axis collapsed to its fixed value)."""
    base = law.law if isinstance(law, Frozen) else law
    grid = get_grid(law_name, cfg.grid) if isinstance(cfg.grid, str) else cfg.grid
    if list(grid) != list(base.names):
        raise ValueError(f"grid axes {list(grid)} must be the {law_name} law's parameters {list(base.names)}")
    if isinstance(law, Frozen):
        grid = {k: (np.array([law.values[k]]) if k in law.values else v) for k, v in grid.items()}
    return base, grid


def _fit(law_name: str, d: LawData, cfg: FitConfig) -> FitResult:
    law = make_law(law_name, cfg)
    base, grid = _grid_for(law, law_name, cfg)
    free = [base.names.index(n) for n in law.names]
    t0 = time.perf_counter()
    obj = screen(base, grid, d, cfg)
    t1 = time.perf_counter()
    flat = select_starts(obj, grid, law_name, cfg.keep, cfg.per_cell)
    x0 = grid_points(grid, flat)[:, free]
    res = optimise(law, d, x0, torch.ones(1, d.n, dtype=torch.float64), len(x0), cfg)
    t2 = time.perf_counter()
    f = res.f.numpy().copy()
    f[~np.isfinite(f)] = np.inf
    i = int(np.argmin(f))
    x = res.x[i].numpy()
    fbest = float(f[i])
    in_basin = int(np.sum(f <= fbest + 1e-9 * abs(fbest) + 1e-20))
    n_unmoved = int((~res.moved).sum())
    warns = _warnings(law, {n: grid[n] for n in law.names}, x, bool(res.moved[i]), n_unmoved,
                      bool(res.converged[i]))
    return FitResult(
        law=law_name, grid=cfg.grid if isinstance(cfg.grid, str) else "custom", x=x, params=law.natural(x),
        fixed=law.fixed(), objective=fbest, n_runs=d.n,
        n_starts=grid_size(grid), n_optimised=len(x0), n_converged=int(res.converged.sum()),
        n_in_basin=in_basin, n_unmoved=n_unmoved,
        seconds={"screen": t1 - t0, "optimise": t2 - t1, "total": t2 - t0}, warnings=warns,
        candidates=_candidates(res.x.numpy(), f, x0, obj.reshape(-1)[flat]),
        finals=res.x.numpy(), finals_f=f)


# ---- re-optimised resamples: bootstrap and leave-one-budget-out ---------------------------------
def refit_weighted(law_name: str, d: LawData, W: np.ndarray, starts: np.ndarray,
                   cfg: FitConfig | None = None, desc: str = "refit") -> tuple[np.ndarray, np.ndarray]:
    """Best (x (K, P), objective (K,)) for each weight row of W (K, n), all re-optimised in one batch.

    Every row starts from every point of `starts` (M, P): K * M L-BFGS problems in one run.
    """
    cfg = cfg or FitConfig()
    K, M = len(W), len(starts)
    x0 = np.tile(starts, (K, 1))                                   # (K*M, P), row r -> weights r // M
    with _threads(cfg.threads):
        res = optimise(make_law(law_name, cfg), d, x0, torch.tensor(W, dtype=torch.float64), M, cfg, desc)
    f = res.f.numpy().reshape(K, M)
    f = np.where(np.isfinite(f), f, np.inf)
    best = f.argmin(1)
    x = res.x.numpy().reshape(K, M, -1)[np.arange(K), best]
    return x, f[np.arange(K), best]


def bootstrap(law_name: str, d: LawData, result: FitResult, n_boot: int, seed: int = 0,
              cfg: FitConfig | None = None) -> np.ndarray:
    """(n_boot, P) log-space parameters, each replicate (runs resampled with replacement) re-optimised."""
    rng = np.random.default_rng(seed)
    W = rng.multinomial(d.n, np.full(d.n, 1.0 / d.n), size=n_boot).astype(np.float64)   # (K, n)
    x, _ = refit_weighted(law_name, d, W, result.candidates, cfg, desc="bootstrap")
    return x


def budget_keys(C: np.ndarray) -> np.ndarray:
    """Group runs into compute budgets: equal after rounding log10(C) to 0.05 decades."""
    return np.round(np.log10(C) / 0.05).astype(np.int64)


def leave_one_budget_out(law_name: str, d: LawData, C: np.ndarray, result: FitResult,
                         cfg: FitConfig | None = None) -> dict:
    """Refit without each budget in turn (one batch), predict the held-out runs; relative loss errors.

    Per budget: mean and max |L_pred / L - 1| over its runs (with noisy losses this is bounded below by
    the noise itself), and rel_err_of_mean = |mean L_pred / mean L - 1| (the budget's bias).
    """
    keys = budget_keys(C)
    uniq = np.unique(keys)
    if len(uniq) < 2:
        return {"budgets": [], "note": "fewer than two compute budgets: nothing to hold out"}
    W = (keys[None, :] != uniq[:, None]).astype(np.float64)        # (F, n): 0 = held out
    cfg = cfg or FitConfig()
    x, _ = refit_weighted(law_name, d, W, result.candidates, cfg, desc="validation")
    law = make_law(law_name, cfg)
    pred, _ = law.predict(torch.tensor(x), d)                      # (F, n)
    rel = (pred - d.y).exp().numpy() - 1.0                         # L_pred / L - 1
    obs = d.y.exp().numpy()
    rows = []
    for f, k in enumerate(uniq):
        m = keys == k
        e = np.abs(rel[f, m])
        mean_pred = float(np.mean(obs[m] * (1.0 + rel[f, m])))
        rows.append({"C": float(np.median(C[m])), "n": int(m.sum()), "mean_abs_rel_err": float(e.mean()),
                     "max_abs_rel_err": float(e.max()),
                     "rel_err_of_mean": abs(mean_pred / float(np.mean(obs[m])) - 1.0)})
    return {"budgets": rows, "largest_budget_mean_abs_rel_err": rows[-1]["mean_abs_rel_err"],
            "largest_budget_rel_err_of_mean": rows[-1]["rel_err_of_mean"],
            "mean_abs_rel_err": float(np.mean([r["mean_abs_rel_err"] for r in rows])),
            "fold_params": [law.natural(xi) for xi in x]}


def confidence(law_name: str, xs: np.ndarray, budgets=(1e19, 1e20, 1e21), level: float = 0.95,
               cfg: FitConfig | None = None) -> dict:
    """Percentile CIs of the parameters and of derived quantities (N_opt exponent, N_opt(C) for C = 6ND).

    xs: (K, P) replicates in the law's (free) log-space parameters. Frozen parameters and the branch law's
    D_d have a single value, so their "interval" is that one value."""
    law = make_law(law_name, cfg or FitConfig())
    nat = [law.natural(x) for x in xs]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {k: [float(v) for v in np.percentile([n[k] for n in nat], q)] for k in nat[0]}
    if law_name in ("family", "dense"):
        al, be = (np.array([n[k] for n in nat]) for k in ("alpha", "beta"))
        lnA, lnB = (np.log([n[k] for n in nat]) for k in ("A", "B"))
        s = al + be
        with np.errstate(divide="ignore", invalid="ignore"):
            out["N_opt_exponent"] = [float(v) for v in np.percentile(be / s, q)]
            for C in budgets:
                # closed-form frontier (C = 6 N D) per replicate, in log space to stay finite
                lnN = (np.log(al) + lnA - np.log(be) - lnB) / s + be / s * math.log(C / 6.0)
                out[f"N_opt@{C:.0e}"] = [float(v) for v in np.exp(np.percentile(lnN, q))]
    out["level"] = level
    out["n_boot"] = len(xs)
    return out


def delta_scan(law_name: str, d: LawData, deltas=(1e-4, 1e-3, 1e-2, 1e-1), cfg: FitConfig | None = None) -> list[dict]:
    """The same fit at several Huber thresholds: [{"delta", "params", "objective", "warnings"}] per delta.

    The paper picks delta = 1e-3 and calls the fit insensitive to it; this shows by how much it moves."""
    cfg = cfg or FitConfig()
    out = []
    for delta in deltas:
        r = fit(law_name, d, replace(cfg, delta=float(delta)))
        out.append({"delta": float(delta), "params": r.params, "objective": r.objective, "warnings": r.warnings})
    return out
