"""Can these runs determine this law? One-line refusals and warnings, decided before any fitting.

Family / dense law, L = E + A N^-alpha + B D^-beta (times G^gamma): the N term needs >= 3 distinct N (with
two, E + A N^-alpha gives two numbers for three unknowns), likewise D; gamma needs >= 2 values of G; and
there must be more runs than free parameters. Branch law: alpha_P needs rows with P > 0, beta_Q rows with
Q > 0, a >= 2 distinct D. Refusals are what makes a fit meaningless (the runaway E = 0, A = inf, alpha = 353
on eight runs came from two sizes); warnings are what makes it weak (N spanning under 3x, one budget).
Parameters the caller holds fixed need no data. This file reads arrays only; it fits nothing.
"""
from __future__ import annotations

import numpy as np

from fitting.data import Runs

N_PARAMS = {"family": 6, "dense": 5, "branch": 3}


def _distinct(v: np.ndarray) -> int:
    """Distinct values up to 2 % (exit-head norms and whole-step rounding move N and D by less)."""
    return len(np.unique(np.round(np.log(v) / 0.02)))


def _family_problems(law: str, runs: Runs, fixed: set[str]) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    free_N = not {"a", "alpha"} <= fixed
    free_D = not {"b", "beta"} <= fixed
    for name, v, free, need in (("N", runs.N, free_N, "E, A, alpha"), ("D", runs.D, free_D, "E, B, beta")):
        if not free:
            continue
        k = _distinct(v)
        if k < 3:
            errors.append(f"{k} distinct {name} value(s): the {name} term ({need}) needs runs at >= 3 values of {name}")
        elif v.max() / v.min() < 3.0:
            warnings.append(f"{name} spans only {v.max() / v.min():.2g}x: its exponent and coefficient are weakly "
                            f"determined")
    if law == "family" and "gamma" not in fixed and _distinct(runs.G) < 2:
        errors.append(f"every run has G = {runs.G[0]:g}: gamma needs runs at >= 2 values of G "
                      f"(fit --law dense, or hold gamma with --fix gamma=VALUE)")
    budgets = np.unique(np.round(np.log10(runs.C) / 0.05))
    if len(budgets) < 2 and not errors:
        warnings.append("every run shares one compute budget: N and D move together (D = C / 6N), so the N "
                        "and D terms are told apart only by curvature")
    return errors, warnings


def _branch_problems(runs: Runs, fixed: set[str]) -> tuple[list[str], list[str]]:
    errors = []
    if "alpha_P" not in fixed and not np.any(runs.P > 0):
        errors.append("no exit has an exit before it (P > 0): alpha_P is undetermined")
    if "beta_Q" not in fixed and not np.any(runs.Q > 0):
        errors.append("no exit has an exit after it (Q > 0): beta_Q is undetermined")
    if "a" not in fixed and _distinct(runs.D) < 2:
        errors.append("every row has the same D: the penalty's data exponent a is undetermined")
    return errors, []


def design_problems(law: str, runs: Runs, fixed: dict | None = None) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for fitting `law` to `runs` with the log-space parameters in `fixed` held."""
    fixed = set(fixed or {})
    n_free = N_PARAMS[law] - len(fixed)
    errors: list[str] = []
    if runs.n <= n_free:
        errors.append(f"{runs.n} run(s) cannot determine {n_free} free parameters of the {law} law")
    more, warnings = (_branch_problems(runs, fixed) if law == "branch"
                      else _family_problems(law, runs, fixed))
    return errors + more, warnings


def refusal_line(law: str, runs: Runs, errors: list[str], source: str = "") -> str:
    """The one line a user sees: every reason, joined, plus what a single trained family is."""
    msg = "; ".join(errors)
    if law in ("family", "dense") and runs.n == 1:
        msg += (" -- one trained family (such as trunk/builtin/runs.jsonl) is a single point (N, D, G) on the "
                "law; fitting needs a sweep over sizes, budgets and G")
    return f"{source}: {msg}" if source else msg
