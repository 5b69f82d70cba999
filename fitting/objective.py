"""The fitting objective: Huber(delta) on log residuals, SUMMED over runs, with analytic gradients.

Shapes: B = starts (rows of the batch), n = runs (data points), P = law parameters.
Each law is written in log space with its parameters in the order of its `names`:

  family  x = (e, a, b, alpha, beta, gamma)
          log L = LSE(e, a - alpha ln N, b - beta ln D) + gamma ln G      (E, A, B = exp(e, a, b))
          or, with G^gamma on the learnable part only (gamma_on="learnable"):
          log L = LSE(e, a + gamma ln G - alpha ln N, b + gamma ln G - beta ln D)
  dense   x = (e, a, b, alpha, beta)            the family law without the gamma term
  branch  x = (alpha_P, beta_Q, a), D_d held fixed (a property of the law object, not a parameter)
          log L = ln(L_dense + (alpha_P P + beta_Q Q) exp(a (ln D_d - ln D)))
          alpha_P, beta_Q and D_d are not separately identifiable (only alpha_P D_d^a, beta_Q D_d^a and a
          are), so D_d is fixed at a stated value: the paper's 2.75e6 unless the caller picks another.

`evaluate(x, w)` gives the objective sum_i w_i Huber(log L_pred_i - log L_i) for each row and its
gradient; w (B, n) holds per-row data weights (bootstrap counts, 0 for held-out runs).
Every law has box `bounds` on its log-space parameters (the optimiser projects onto them; see BOUNDS for
the numbers and why), and `Frozen(law, {name: value})` holds some parameters fixed while the rest are fit.
This file does not optimise anything (see `lbfgs.py`) and does not know about grids (see `grids.py`).
"""
from __future__ import annotations

import abc

import math
from dataclasses import dataclass

import torch

from fitting.laws import PAPER_BRANCH

HUBER_DELTA = 1e-3

# Box bounds on the log-space parameters. Wide enough to hold every grid start and any plausible language-
# model fit (Chinchilla's exponents are ~0.3, E ~ 1.7 nats), tight enough that a fit to too few or degenerate
# runs stops at a bound (and says so) instead of running to E = 0, A = inf, alpha = 353.
BOUNDS: dict[str, tuple[float, float]] = {
    "e": (-3.0, 3.0),          # E in [0.05, 20] nats
    "a": (-10.0, 40.0),        # A in [4.5e-5, 2.4e17]
    "b": (-10.0, 40.0),        # B likewise
    "alpha": (0.0, 3.0),       # size exponent: non-negative (more parameters never hurt), at most 3
    "beta": (0.0, 3.0),        # data exponent likewise
    "gamma": (-1.0, 3.0),      # granularity exponent (the paper's grid spans 0..2)
    "alpha_P": (-1.0, 1.0),    # branch penalty per exit before (nats per unit of (D_d / D)^a)
    "beta_Q": (-1.0, 1.0),     # branch penalty per exit after
    "a_branch": (0.0, 3.0),    # branch data exponent ("a" of the branch law)
}


def huber(r: torch.Tensor, delta: float = HUBER_DELTA) -> torch.Tensor:
    """0.5 r^2 for |r| <= delta, delta (|r| - delta/2) beyond: quadratic core, linear tails."""
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclass
class LawData:
    """Per-run features as float64 tensors (n,); unused ones are zeros."""
    y: torch.Tensor        # ln loss
    lnN: torch.Tensor
    lnD: torch.Tensor
    lnG: torch.Tensor
    P: torch.Tensor        # exits before this one (branch)
    Q: torch.Tensor        # exits after this one  (branch)
    Ld: torch.Tensor       # L_dense, the size-matched dense loss (branch)

    @property
    def n(self) -> int:
        return len(self.y)


class Law(abc.ABC):
    """One law: its parameter names and its log prediction with a vector-Jacobian product."""
    name = ""
    names: tuple[str, ...] = ()

    def bounds(self) -> tuple[list[float], list[float]]:
        """(lower, upper) box bounds of the log-space parameters, in `names` order."""
        keys = [self._bound_key(n) for n in self.names]
        return [BOUNDS[k][0] for k in keys], [BOUNDS[k][1] for k in keys]

    def _bound_key(self, name: str) -> str:
        return name

    @abc.abstractmethod
    def predict(self, x: torch.Tensor, d: LawData):
        """(log L_pred (B, n), cache for `vjp`)."""
        ...

    @abc.abstractmethod
    def vjp(self, x: torch.Tensor, d: LawData, cache, hp: torch.Tensor) -> torch.Tensor:
        """J^T hp: (B, P) gradient of sum_i hp_i * log L_pred_i."""
        ...

    @abc.abstractmethod
    def natural(self, x) -> dict:
        """Log-space row -> the published parameter names and values."""
        ...

    @abc.abstractmethod
    def to_x(self, params: dict) -> list[float]:
        ...

    def fixed(self) -> dict:
        """Constants the law holds fixed rather than fits (reported next to the parameters)."""
        return {}


class FamilyLaw(Law):
    """The family law; `gamma_on` = "equation" (eq. (1), G^gamma on everything) or "learnable" (on A, B terms)."""
    name = "family"
    names = ("e", "a", "b", "alpha", "beta", "gamma")
    with_gamma = True

    def __init__(self, gamma_on: str = "equation"):
        if gamma_on not in ("equation", "learnable"):
            raise ValueError(f"gamma_on must be 'equation' or 'learnable', got {gamma_on!r}")
        self.gamma_on = gamma_on

    def predict(self, x, d):
        e, a, b, al, be = (x[:, i:i + 1] for i in range(5))
        shift = x[:, 5:6] * d.lnG if self.with_gamma else None    # (B, n) gamma ln G
        inner = self.with_gamma and self.gamma_on == "learnable"
        t0 = e.expand(-1, d.n)                                     # (B, n)
        t1 = a - al * d.lnN + (shift if inner else 0.0)            # (B, n)
        t2 = b - be * d.lnD + (shift if inner else 0.0)            # (B, n)
        m = torch.maximum(torch.maximum(t0, t1), t2)
        w0, w1, w2 = (t0 - m).exp(), (t1 - m).exp(), (t2 - m).exp()
        s = w0 + w1 + w2
        out = m + s.log()
        if self.with_gamma and not inner:
            out = out + shift
        return out, (w0 / s, w1 / s, w2 / s)

    def vjp(self, x, d, cache, hp):
        p0, p1, p2 = cache
        h1, h2 = hp * p1, hp * p2                                  # (B, n)
        cols = [(hp * p0).sum(-1), h1.sum(-1), h2.sum(-1), -(h1 @ d.lnN), -(h2 @ d.lnD)]
        if self.with_gamma:
            # d log L / d gamma = ln G (equation) or (p1 + p2) ln G (learnable: only the A, B terms carry it)
            cols.append((hp if self.gamma_on == "equation" else h1 + h2) @ d.lnG)
        return torch.stack(cols, -1)                               # (B, P)

    def natural(self, x):
        x = [float(v) for v in x]
        out = {"E": _exp(x[0]), "A": _exp(x[1]), "alpha": x[3], "B": _exp(x[2]), "beta": x[4]}
        if self.with_gamma:
            out["gamma"] = x[5]
        return out

    def to_x(self, p):
        x = [math.log(p["E"]), math.log(p["A"]), math.log(p["B"]), p["alpha"], p["beta"]]
        return x + [p.get("gamma", 0.0)] if self.with_gamma else x


class DenseLaw(FamilyLaw):
    name = "dense"
    names = ("e", "a", "b", "alpha", "beta")
    with_gamma = False


class BranchLaw(Law):
    """The branch law with D_d fixed at `D_d` (see the module docstring for why it is not fitted)."""
    name = "branch"
    names = ("alpha_P", "beta_Q", "a")

    def __init__(self, D_d: float = PAPER_BRANCH.D_d, D_unit: float = PAPER_BRANCH.D_unit):
        self.D_d = float(D_d)
        self.D_unit = float(D_unit)                                # tokens per unit of D (and of D_d)

    def _bound_key(self, name: str) -> str:
        return "a_branch" if name == "a" else name

    def predict(self, x, d):
        aP, bQ, a = (x[:, i:i + 1] for i in range(3))
        z = math.log(self.D_d * self.D_unit) - d.lnD               # (n,) ln(D_d / D), D in tokens
        u = (a * z).exp()                                          # (B, n) (D_d / D)^a
        s = aP * d.P + bQ * d.Q                                    # (B, n) branch-point penalty
        L = (d.Ld + s * u).clamp_min(1e-300)                       # (B, n); < 0 only far off, kept finite
        return L.log(), (u / L, s * u * z / L)

    def vjp(self, x, d, cache, hp):
        # d ln L / d alpha_P = P u / L,  d / d beta_Q = Q u / L,  d / d a = s u ln(D_d / D) / L
        uL, dA = cache
        h = hp * uL                                                # (B, n)
        return torch.stack([h @ d.P, h @ d.Q, (hp * dA).sum(-1)], -1)

    def natural(self, x):
        x = [float(v) for v in x]
        return {"alpha_P": x[0], "beta_Q": x[1], "D_d": self.D_d, "a": x[2]}

    def to_x(self, p):
        return [p["alpha_P"], p["beta_Q"], p["a"]]

    def fixed(self) -> dict:
        return {"D_d": self.D_d, "D_unit": self.D_unit}


class Frozen(Law):
    """`law` with the log-space parameters in `values` held fixed; x holds only the free ones, in order."""

    def __init__(self, law: Law, values: dict[str, float]):
        unknown = sorted(set(values) - set(law.names))
        if unknown:
            raise ValueError(f"cannot fix {unknown}: the {law.name} law's parameters are {list(law.names)}")
        self.law, self.values = law, dict(values)
        self.name = law.name
        self.free = [i for i, n in enumerate(law.names) if n not in values]
        self.names = tuple(law.names[i] for i in self.free)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P_free) -> (B, P) with the fixed values filled in."""
        out = torch.empty(x.shape[0], len(self.law.names), dtype=x.dtype)
        out[:, self.free] = x
        for n, v in self.values.items():
            out[:, self.law.names.index(n)] = v
        return out

    def predict(self, x, d):
        return self.law.predict(self.full(x), d)

    def vjp(self, x, d, cache, hp):
        return self.law.vjp(self.full(x), d, cache, hp)[:, self.free]

    def natural(self, x):
        return self.law.natural(self.full(torch.as_tensor(x, dtype=torch.float64)[None])[0])

    def to_x(self, params):
        full = self.law.to_x(params)
        return [full[i] for i in self.free]

    def bounds(self):
        lo, hi = self.law.bounds()
        return [lo[i] for i in self.free], [hi[i] for i in self.free]

    def fixed(self) -> dict:
        return {**self.law.fixed(), **{n: float(v) for n, v in self.values.items()}}


def _exp(v: float) -> float:
    return math.exp(v) if v < 709 else math.inf


LAWS: dict[str, Law] = {"family": FamilyLaw(), "dense": DenseLaw(), "branch": BranchLaw()}


def get_law(name: str, branch_D_d: float | None = None, gamma_on: str = "equation",
            fixed: dict[str, float] | None = None, branch_D_unit: float | None = None) -> Law:
    """The law called `name`: the family law under `gamma_on`; the branch law with D_d held at `branch_D_d`
    in units of `branch_D_unit` tokens (defaults: the paper's); `fixed` log-space parameters frozen."""
    if name == "branch":
        law = BranchLaw(PAPER_BRANCH.D_d if branch_D_d is None else branch_D_d,
                        PAPER_BRANCH.D_unit if branch_D_unit is None else branch_D_unit)
    elif name == "family":
        law = FamilyLaw(gamma_on)
    else:
        law = LAWS[name]
    return Frozen(law, fixed) if fixed else law


def evaluate(law: Law, x: torch.Tensor, d: LawData, w: torch.Tensor,
             delta: float = HUBER_DELTA) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective (B,), gradient (B, P)) of sum_i w_i Huber(log L_pred_i - log L_i)."""
    pred, cache = law.predict(x, d)
    r = pred - d.y                                                 # (B, n)
    f = (w * huber(r, delta)).sum(-1)
    hp = w * r.clamp(-delta, delta)                                # Huber'(r), weighted
    return f, law.vjp(x, d, cache, hp)
