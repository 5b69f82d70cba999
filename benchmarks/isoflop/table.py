"""The IsoFLOP study's "paper / ours" table (docs/isoflop.md), in Markdown, from its fits and runs.

    python benchmarks/isoflop/table.py benchmarks/results/isoflop/runs.jsonl \
        --fit benchmarks/results/isoflop/fit.json [--branch benchmarks/results/isoflop/fit_branch.json]

Rows: the family law's constants with their 95 % bootstrap CIs (when fit.json has them), gamma, the
N_opt exponent beta / (alpha + beta), EL (loss form) at the study's budgets and at 1e21 under each
reading of the dense side (fitting/leverage.py: the paper's words admit three), for the paper's constants
and the fitted ones alike, the branch law's alpha_P and beta_Q, and what the runs show without any law
(at how many sizes the mean exit loss rises with G). Nothing is fitted here; bad input is one line on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import FigureError, read_law, read_runs  # noqa: E402

from fitting.laws import PAPER, PAPER_BRANCH, LawParams  # noqa: E402
from fitting.leverage import DENSE_SIDES, efficiency_leverage  # noqa: E402

PAPER_N_OPT_EXPONENT = PAPER.beta / (PAPER.alpha + PAPER.beta)


def _g(v: float) -> str:
    return f"{v:.4g}"


def _with_ci(v: float, ci: dict, key: str) -> str:
    lo_hi = ci.get(key)
    return f"{_g(v)} [{_g(lo_hi[0])}, {_g(lo_hi[1])}]" if lo_hi else _g(v)


def el_cell(p: LawParams, budgets: list[float], Gs=(2, 4)) -> str:
    """EL per reading of the dense side: G=2 and G=4 at the smallest and largest study budget and at 1e21."""
    Cs = sorted({budgets[0], budgets[-1], 1e21})
    parts = []
    for side in DENSE_SIDES:
        vals = "; ".join(f"G={G}: " + ", ".join(_g(float(efficiency_leverage(C, G, p, side))) for C in Cs)
                         for G in Gs)
        parts.append(f"*{side}* {vals}")
    return "<br>".join(parts)


def rises_with_G(runs: list[dict]) -> str:
    """Per budget: at how many grid sizes the mean exit loss grows with every step in G."""
    out = []
    for C in sorted({r["sweep"]["budget"] for r in runs}):
        by_n: dict[tuple[int, int], dict[int, float]] = {}
        for r in runs:
            if r["sweep"]["budget"] == C and r["sweep"]["role"] == "grid":
                shape = (r["config"]["model"]["d_model"], r["n_layers"])  # N differs by G (the exit heads)
                by_n.setdefault(shape, {})[r["G"]] = r["loss"]
        full = [d for d in by_n.values() if len(d) > 1]
        rising = sum(all(np.diff([d[G] for G in sorted(d)]) > 0) for d in full)
        if full:
            out.append(f"{C:.0e}: {rising} of {len(full)}")
    return "; ".join(out) or "no budget with several G at one size"


def table(runs: list[dict], p: LawParams, fit: dict, branch: dict | None = None) -> str:
    """The Markdown table; `p` the fitted family law, `fit` its fit.json (CIs, run count)."""
    ci = fit.get("ci") or {}
    budgets = sorted({r["sweep"]["budget"] for r in runs})
    rows = [("family law E, A, alpha, B, beta (95 % CI)",
             ", ".join(_g(getattr(PAPER, k)) for k in ("E", "A", "alpha", "B", "beta")),
             "<br>".join(f"{k} {_with_ci(getattr(p, k), ci, k)}" for k in ("E", "A", "alpha", "B", "beta"))),
            ("gamma (small, positive), 95 % CI", _g(PAPER.gamma), _with_ci(p.gamma, ci, "gamma")),
            ("N_opt exponent beta / (alpha + beta)", _g(PAPER_N_OPT_EXPONENT),
             _with_ci(p.beta / (p.alpha + p.beta), ci, "N_opt_exponent")),
            (f"EL > 1, falling with compute (loss form, G = 2 and 4 at C = {budgets[0]:.0e}, {budgets[-1]:.0e}, 1e21)",
             el_cell(PAPER, budgets), el_cell(p, budgets)),
            ("mean exit loss rises with G (runs, no law: sizes per budget)", "yes", rises_with_G(runs))]
    if branch is not None:
        b, bci = branch.get("params", {}), branch.get("ci") or {}
        rows.append(("branch law: upstream exits cheap (alpha_P << beta_Q)",
                     f"alpha_P {_g(PAPER_BRANCH.alpha_P)}, beta_Q {_g(PAPER_BRANCH.beta_Q)}",
                     f"alpha_P {_with_ci(b['alpha_P'], bci, 'alpha_P')}, beta_Q {_with_ci(b['beta_Q'], bci, 'beta_Q')}"))
    lines = ["| claim (arXiv 2512.23407) | paper | ours |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + f"\n\n{len(runs)} runs, {fit.get('n_runs', '?')} in the family fit" + \
        (f", {branch.get('n_runs', '?')} in the branch fit" if branch else "") + ".\n"


def _read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text())
        doc["params"]  # noqa: B018 - a familial-fit --json result has it
        return doc
    except OSError as e:
        raise FigureError(f"{path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise FigureError(f"{path}: not a familial-fit --json result ({what})") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, help="the sweep's runs.jsonl")
    ap.add_argument("--fit", type=Path, required=True, help="familial-fit --law family --json output")
    ap.add_argument("--branch", type=Path, help="familial-fit --law branch --json output (adds its row)")
    args = ap.parse_args(argv)
    try:
        runs = read_runs(args.runs)
        p = read_law(args.fit)
        fit = _read_json(args.fit, "family law")
        branch = _read_json(args.branch, "branch law") if args.branch else None
        if branch is not None and not {"alpha_P", "beta_Q"} <= set(branch["params"]):
            raise FigureError(f"{args.branch}: not a branch-law fit (no alpha_P / beta_Q)")
    except FigureError as e:
        print(f"table.py: error: {e}", file=sys.stderr)
        return 2
    print(table(runs, p, fit, branch), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
