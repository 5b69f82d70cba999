"""The familial scaling laws as plain functions, with the paper's constants as a named preset.

Family law (arXiv 2512.23407):   L(N, D, G) = (E + A / N^alpha + B / D^beta) * G^gamma
  N = non-embedding parameters, D = training tokens, G = number of exits; L = the weighted mean of the
  exits' validation losses (w_g = 1/G). The dense law is the same with G = 1 (Chinchilla form).
Branch law (the paper's, see `branch_loss`): the loss of one exit of a family against a dense model of
  the exit's size trained on the same D,  L(P, Q, D) = L_dense + (alpha_P P + beta_Q Q) (D_d / D)^a,
  P / Q = the numbers of exits before / after this one.
Compute-optimal frontier: closed form for C = k N D (`frontier`) and numeric for any FLOP-per-token
  function (`frontier_numeric`).
Efficiency Leverage: two forms, `efficiency_leverage` (loss ratio) and `efficiency_leverage_compute`
  (compute ratio); their docstrings give the exact definitions (also in docs/fitting.md).

Everything here is numpy and vectorised over its array arguments. Fitting lives in `fitter.py`,
drawing in `figures.py`; this file does no I/O and imports nothing of ours.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar


@dataclass(frozen=True)
class LawParams:
    E: float                 # irreducible loss (nats/token)
    A: float                 # size-term coefficient
    alpha: float             # size exponent
    B: float                 # data-term coefficient
    beta: float              # data exponent
    gamma: float = 0.0       # granularity exponent (0 for the dense law)
    source: str = ""         # where the numbers come from

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    def replace(self, **kw) -> "LawParams":
        return replace(self, **kw)


@dataclass(frozen=True)
class BranchParams:
    alpha_P: float           # penalty per exit before this one (P = exits shallower than it)
    beta_Q: float            # penalty per exit after this one (Q = exits deeper than it)
    D_d: float               # data scale of the penalty: it decays as (D_d / D)^a
    a: float                 # data exponent of the penalty
    source: str = ""
    # alpha_P, beta_Q and D_d are not separately identifiable: only alpha_P D_d^a, beta_Q D_d^a and a are.
    # The fitter therefore holds D_d fixed (default the paper's) and fits alpha_P, beta_Q and a.

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


# The paper's fits (arXiv 2512.23407): the family law's six constants and the branch law's four. In log
# space ln A = 6.0 and ln B = 8.0, inside the `paper` start grid's a, b range. Every test and figure reads
# the constants from this one place.
PAPER = LawParams(E=1.0059, A=403.4289, alpha=0.2982, B=2980.958, beta=0.3412, gamma=0.0333,
                  source="arXiv 2512.23407 (the paper's family-law fit)")
PAPER_DENSE = PAPER.replace(gamma=0.0, source="arXiv 2512.23407 (the paper's family-law fit at G = 1)")
PAPER_BRANCH = BranchParams(alpha_P=1e-3, beta_Q=0.0397, D_d=2.75e6, a=0.5734,
                            source="arXiv 2512.23407 (the paper's branch-law fit)")
PRESETS = {"paper": PAPER, "paper-dense": PAPER_DENSE}
K_CHINCHILLA = 6.0  # C = 6 N D


# ---- the laws ------------------------------------------------------------------------------------
def family_loss(N, D, G, p: LawParams = PAPER):
    """L(N, D, G) = (E + A N^-alpha + B D^-beta) G^gamma, broadcasting over N, D, G."""
    N, D, G = (np.asarray(v, dtype=np.float64) for v in (N, D, G))
    return (p.E + p.A * N ** -p.alpha + p.B * D ** -p.beta) * G ** p.gamma


def dense_loss(N, D, p: LawParams = PAPER):
    """The dense law: the family law at G = 1 (gamma plays no part)."""
    return family_loss(N, D, 1.0, p)


def branch_loss(P, Q, D, L_dense, b: BranchParams = PAPER_BRANCH):
    """Loss of one exit of a family: L = L_dense + (alpha_P P + beta_Q Q) (D_d / D)^a (the paper's form).

    P: exits before this one (exit g of G, 0-based: P = g); Q: exits after it (Q = G - 1 - g); D:
    training tokens; L_dense: the loss of a dense model of the exit's size trained on the same D. The
    penalty over that dense model grows linearly with the branch points on either side and fades with
    data as D^-a; the paper's alpha_P ~ 1e-3 against beta_Q ~ 0.04 says the exits before this one cost
    almost nothing, the ones after it (which share and pull on its layers) cost more.
    """
    P, Q, D, L_dense = (np.asarray(v, dtype=np.float64) for v in (P, Q, D, L_dense))
    return L_dense + (b.alpha_P * P + b.beta_Q * Q) * (b.D_d / D) ** b.a


# ---- compute-optimal frontier --------------------------------------------------------------------
def n_opt_exponent(p: LawParams) -> float:
    """N_opt ∝ C^(beta / (alpha + beta)) under C = k N D."""
    return p.beta / (p.alpha + p.beta)


def frontier(C, p: LawParams = PAPER, k: float = K_CHINCHILLA):
    """(N_opt, D_opt) minimising L at C = k N D, closed form (G^gamma does not move the optimum).

    Minimise A N^-alpha + B D^-beta with D = C / (k N):  alpha A N^-alpha = beta B D^-beta, so
    N_opt = (alpha A / (beta B))^(1/(alpha+beta)) * (C/k)^(beta/(alpha+beta)),  D_opt = C / (k N_opt).
    """
    C = np.asarray(C, dtype=np.float64)
    s = p.alpha + p.beta
    N = (p.alpha * p.A / (p.beta * p.B)) ** (1.0 / s) * (C / k) ** (p.beta / s)
    return N, C / (k * N)


def frontier_numeric(C, p: LawParams, flops_per_token: Callable[[float], float], G: int = 1,
                     N_bounds: tuple[float, float] = (1e5, 1e14)):
    """(N_opt, D_opt) at each budget C for an arbitrary FLOP count: D = C / flops_per_token(N).

    `flops_per_token(N)` is training FLOPs per token of the model with N non-embedding parameters
    (e.g. a shape rule composed with `trunk.flops.flops_per_token`). Each budget is a bounded 1-D
    minimisation in log N (Brent, xatol 1e-10), so the loop is over budgets, never over grid points.
    """
    Cs = np.atleast_1d(np.asarray(C, dtype=np.float64))
    lo, hi = math.log(N_bounds[0]), math.log(N_bounds[1])
    Ns = np.empty_like(Cs)
    for i, c in enumerate(Cs):
        def obj(lnN, c=c):
            N = math.exp(lnN)
            return math.log(float(family_loss(N, c / flops_per_token(N), G, p)))
        Ns[i] = math.exp(minimize_scalar(obj, bounds=(lo, hi), method="bounded",
                                         options={"xatol": 1e-10}).x)
    Ds = Cs / np.array([flops_per_token(n) for n in Ns])
    shape = np.shape(C)
    return Ns.reshape(shape), Ds.reshape(shape)


def optimal_loss(C, p: LawParams = PAPER, G=1, k: float = K_CHINCHILLA):
    """Loss of the compute-optimal model (family of G exits) at budget C under C = k N D."""
    N, D = frontier(C, p, k)
    return family_loss(N, D, G, p)


# ---- Efficiency Leverage -------------------------------------------------------------------------
def _exit_fractions(G: int, fractions: Sequence[float] | None) -> np.ndarray:
    f = np.arange(1, G + 1) / G if fractions is None else np.asarray(fractions, dtype=np.float64)
    if len(f) != G or not np.all((f > 0) & (f <= 1)) or not np.all(np.diff(f) > 0) or f[-1] != 1.0:
        raise ValueError(f"exit fractions must be G={G} increasing values in (0, 1] ending at 1, got {list(f)}")
    return f


def dense_set_loss(C, G: int, p: LawParams = PAPER, k: float = K_CHINCHILLA,
                   exit_fractions: Sequence[float] | None = None):
    """Mean loss of G independent compute-optimal dense models that share the budget C.

    The models have the exits' relative sizes N_g ∝ f_g (f_g = l_g / L, default g / G) and each sits on
    the dense compute-optimal frontier, N_g = N_opt(C_g). With N_opt ∝ C^(beta/(alpha+beta)) that fixes
    the split: C_g = C * f_g^r / sum_h f_h^r, r = (alpha+beta)/beta, and sum_g C_g = C.
    """
    f = _exit_fractions(G, exit_fractions)
    r = (p.alpha + p.beta) / p.beta
    share = f ** r / np.sum(f ** r)                                          # (G,)
    C = np.asarray(C, dtype=np.float64)
    Cg = C[..., None] * share                                                # (..., G)
    return optimal_loss(Cg, p.replace(gamma=0.0), 1, k).mean(-1)


def efficiency_leverage(C, G: int, p: LawParams = PAPER, k: float = K_CHINCHILLA,
                        exit_fractions: Sequence[float] | None = None):
    """EL (loss form) = L_dense_set(C) / L_family(C), > 1 when the family is the better buy.

    L_family(C): the family law at its compute-optimal (N, D) for C = k N D, i.e. the family's average
    exit loss. L_dense_set(C): the mean loss of G independent compute-optimal dense models of the exits'
    (relative) sizes sharing the same budget C (`dense_set_loss`). Both sides spend exactly C.
    """
    return dense_set_loss(C, G, p, k, exit_fractions) / optimal_loss(C, p, G, k)


def efficiency_leverage_compute(C, G: int, p: LawParams = PAPER, k: float = K_CHINCHILLA,
                                exit_fractions: Sequence[float] | None = None):
    """EL (compute form) = C_dense / C: the budget the dense set needs to match the family's loss at C.

    As in MoE "leverage" papers: C_dense solves L_dense_set(C_dense) = L_family(C) (same dense set as
    `efficiency_leverage`). inf when the dense set cannot reach it (L_family below the floor E).
    """
    Cs = np.atleast_1d(np.asarray(C, dtype=np.float64))
    out = np.empty_like(Cs)
    for i, c in enumerate(Cs):
        target = math.log(float(optimal_loss(c, p, G, k)))
        if target <= math.log(p.E) + 1e-12:
            out[i] = math.inf
            continue
        h = lambda lc: math.log(float(dense_set_loss(math.exp(lc), G, p, k, exit_fractions))) - target
        lo, hi = math.log(c) - 20.0, math.log(c) + 20.0
        while h(hi) > 0:
            hi += 20.0
        out[i] = math.exp(brentq(h, lo, hi, xtol=1e-12, rtol=1e-14)) / c
    return out.reshape(np.shape(C))
