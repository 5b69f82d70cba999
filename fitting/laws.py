"""The familial scaling laws as plain functions, with the paper's constants as a named preset.

Family law (arXiv 2512.23407), two readings of where G^gamma acts (`LawParams.gamma_on`):
  "equation"  (eq. (1), the default)      L(N, D, G) = (E + A / N^alpha + B / D^beta) * G^gamma
  "learnable" (the text: G^gamma scales "the learnable component")
                                          L(N, D, G) = E + (A / N^alpha + B / D^beta) * G^gamma
  N = parameters (non-embedding or total, `LawParams.n_kind`), D = training tokens, G = number of exits;
  L = the weighted mean of the exits' validation losses (w_g = 1/G). The dense law is G = 1 (Chinchilla).
Branch law (the paper's, see `branch_loss`): the loss of one exit of a family against a dense model of
  the exit's size trained on the same D,  L(P, Q, D) = L_dense + (alpha_P P + beta_Q Q) (D_d / D)^a,
  P / Q = the numbers of exits before / after this one, D in units of `BranchParams.D_unit` tokens.
Compute-optimal frontier: closed form for C = k N D (`frontier`) and numeric for any FLOP-per-token
  function (`frontier_numeric`). Neither reading of G^gamma moves the optimum.

Everything here is numpy and vectorised over its array arguments. Efficiency Leverage is `leverage.py`,
fitting `fitter.py`, drawing `figures.py`; this file does no I/O and imports nothing of ours.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
from scipy.optimize import minimize_scalar


@dataclass(frozen=True)
class LawParams:
    E: float                 # irreducible loss (nats/token)
    A: float                 # size-term coefficient
    alpha: float             # size exponent
    B: float                 # data-term coefficient
    beta: float              # data exponent
    gamma: float = 0.0       # granularity exponent (0 for the dense law)
    source: str = ""         # where the numbers come from
    gamma_on: str = "equation"     # "equation": G^gamma multiplies E too (eq. (1)); "learnable": only A, B terms
    n_kind: str = "non-embedding"  # what N counts: "non-embedding" or "total" (embeddings included)

    def __post_init__(self):
        if self.gamma_on not in GAMMA_ON:
            raise ValueError(f"gamma_on must be one of {GAMMA_ON}, got {self.gamma_on!r}")
        if self.n_kind not in N_KINDS:
            raise ValueError(f"n_kind must be one of {N_KINDS}, got {self.n_kind!r}")

    def as_dict(self) -> dict:
        """The six constants only (E, A, alpha, B, beta, gamma)."""
        d = asdict(self)
        for k in ("source", "gamma_on", "n_kind"):
            d.pop(k)
        return d

    def replace(self, **kw) -> "LawParams":
        return replace(self, **kw)


@dataclass(frozen=True)
class BranchParams:
    alpha_P: float           # penalty per exit before this one (P = exits shallower than it)
    beta_Q: float            # penalty per exit after this one (Q = exits deeper than it)
    D_d: float               # data scale of the penalty: it decays as (D_d / D)^a, both in D_unit tokens
    a: float                 # data exponent of the penalty
    source: str = ""
    D_unit: float = 1.0      # tokens per unit of D in this law (the paper's fit: 1e3, see PAPER_BRANCH)
    # alpha_P, beta_Q and D_d are not separately identifiable: only alpha_P D_d^a, beta_Q D_d^a and a are.
    # The fitter therefore holds D_d fixed (default the paper's) and fits alpha_P, beta_Q and a.

    def as_dict(self) -> dict:
        """The four constants only (alpha_P, beta_Q, D_d, a)."""
        d = asdict(self)
        d.pop("source")
        d.pop("D_unit")
        return d


GAMMA_ON = ("equation", "learnable")
N_KINDS = ("non-embedding", "total")

# The paper's fits (arXiv 2512.23407): the family law's six constants and the branch law's four. Every test
# and figure reads the constants from this one place. Notes (docs/fitting.md, "Identifiability"):
# - ln A = 6.00000026 and ln B = 8.000000004: both are start-grid points, so A and B most likely never left
#   their starts; the paper prints B as 2980.958 in the introduction and 2980.058 in Sec. 4.1 and the
#   conclusion (a typo: only 2980.958 = e^8 sits on the grid).
# - N: the paper's 1B-4B names match total parameters (~152k untied vocabulary), so n_kind="total".
# - The branch law's D: in tokens its penalty is <= 0.3 % of the loss on the paper's design, far below
#   what a fit could resolve; in thousands of tokens it is 0.4-13 %, matching the paper's visibly rising
#   curves, and in millions it exceeds the loss itself. Hence D_unit = 1e3 (our inference, not printed).
PAPER = LawParams(E=1.0059, A=403.4289, alpha=0.2982, B=2980.958, beta=0.3412, gamma=0.0333,
                  source="arXiv 2512.23407 (the paper's family-law fit)", n_kind="total")
PAPER_DENSE = PAPER.replace(gamma=0.0, source="arXiv 2512.23407 (the paper's family-law fit at G = 1)")
PAPER_BRANCH = BranchParams(alpha_P=1e-3, beta_Q=0.0397, D_d=2.75e6, a=0.5734, D_unit=1e3,
                            source="arXiv 2512.23407 (the paper's branch-law fit; D in thousands of tokens)")
PAPER_B_TYPO = 2980.058  # B as printed in the paper's Sec. 4.1 and conclusion
PRESETS = {"paper": PAPER, "paper-dense": PAPER_DENSE}
K_CHINCHILLA = 6.0  # C = 6 N D


# ---- the laws ------------------------------------------------------------------------------------
def family_law_loss(N, D, G, p: LawParams = PAPER):
    """L(N, D, G), broadcasting over N, D, G: (E + A N^-alpha + B D^-beta) G^gamma under eq. (1)
    (p.gamma_on == "equation"), E + (A N^-alpha + B D^-beta) G^gamma under the text's reading."""
    N, D, G = (np.asarray(v, dtype=np.float64) for v in (N, D, G))
    learnable = p.A * N ** -p.alpha + p.B * D ** -p.beta
    if p.gamma_on == "learnable":
        return p.E + learnable * G ** p.gamma
    return (p.E + learnable) * G ** p.gamma


def dense_loss(N, D, p: LawParams = PAPER):
    """The dense law: the family law at G = 1 (gamma plays no part)."""
    return family_law_loss(N, D, 1.0, p)


def branch_loss(P, Q, D, L_dense, b: BranchParams = PAPER_BRANCH):
    """Loss of one exit of a family: L = L_dense + (alpha_P P + beta_Q Q) (D_d / D)^a (the paper's form).

    P: exits before this one (exit g of G, 0-based: P = g); Q: exits after it (Q = G - 1 - g); D:
    training tokens (divided by b.D_unit inside); L_dense: the loss of a dense model of the exit's size
    trained on the same D. The
    penalty over that dense model grows linearly with the branch points on either side and fades with
    data as D^-a; the paper's alpha_P ~ 1e-3 against beta_Q ~ 0.04 says the exits before this one cost
    almost nothing, the ones after it (which share and pull on its layers) cost more.
    """
    P, Q, D, L_dense = (np.asarray(v, dtype=np.float64) for v in (P, Q, D, L_dense))
    return L_dense + (b.alpha_P * P + b.beta_Q * Q) * (b.D_d * b.D_unit / D) ** b.a


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
            return math.log(float(family_law_loss(N, c / flops_per_token(N), G, p)))
        Ns[i] = math.exp(minimize_scalar(obj, bounds=(lo, hi), method="bounded",
                                         options={"xatol": 1e-10}).x)
    Ds = Cs / np.array([flops_per_token(n) for n in Ns])
    shape = np.shape(C)
    return Ns.reshape(shape), Ds.reshape(shape)


def optimal_loss(C, p: LawParams = PAPER, G=1, k: float = K_CHINCHILLA):
    """Loss of the compute-optimal model (family of G exits) at budget C under C = k N D."""
    N, D = frontier(C, p, k)
    return family_law_loss(N, D, G, p)
