"""Command-line edge of `fitting`: `familial-fit` (runs -> law, CIs, validation, figures) and
`familial-plan` (budget + tiers -> plan + trainer config).

Only argument parsing, printing and file writing live here; the work is in fitter.py, checks.py,
identifiability.py, figures.py and planner.py. Bad input ends with one line on stderr and exit status 2,
never a traceback (`trunk/cmdline.py`, the convention of every familial-* tool); JSON output is strict
(a non-finite number is written as null, with a warning).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from trunk.cmdline import Parser, fail, run, warn

FIT, PLAN = "familial-fit", "familial-plan"


def strict_json(obj):
    """(obj with every non-finite float replaced by None, paths of the replaced values)."""
    replaced: list[str] = []

    def walk(v, path):
        if isinstance(v, dict):
            return {k: walk(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, (float, np.floating)):
            if not math.isfinite(v):
                replaced.append(path)
                return None
            return float(v)
        if isinstance(v, np.integer):
            return int(v)
        return v
    return walk(obj, ""), replaced


def _write_json(path: Path, doc: dict, warn: bool = True) -> None:
    clean, replaced = strict_json(doc)
    if replaced and warn:
        warn(FIT, f"non-finite values written as null: {', '.join(replaced[:6])}"
                    + (f" (+{len(replaced) - 6} more)" if len(replaced) > 6 else ""))
    try:
        path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror}")


# ---- familial-fit --------------------------------------------------------------------------------
def _fixed_arg(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not sep or not name.strip() or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}")
    return name.strip(), v


def _fit_parser() -> Parser:
    p = Parser(
        prog=FIT,
        description="Fit a familial scaling law to training runs (Huber on log residuals, summed; bounded "
                    "batched L-BFGS from a grid of starts), with bootstrap CIs and leave-one-budget-out "
                    "validation.")
    p.add_argument("runs", nargs="?", metavar="RUNS",
                   help="JSONL run records as familial-train writes them (docs/run-record.md) or CSV with a "
                        "header: N,D,G,loss (family/dense; G optional for dense, C and N_total optional) or "
                        "P,Q,D,loss,L_dense (branch)")
    p.add_argument("--law", choices=("family", "branch", "dense"), default="family",
                   help="law to fit: family L(N,D,G), branch L(P,Q,D), or dense L(N,D) on G == 1 runs")
    p.add_argument("--grid", choices=("paper", "hoffmann"), default="paper",
                   help="grid of L-BFGS starts: paper (1.56M starts for family) or hoffmann (22.5k)")
    p.add_argument("--n", choices=("non-embedding", "total"), default="non-embedding", dest="n_kind",
                   help="what N counts: the records' N (non-embedding) or N_total (embeddings included, the "
                        "paper's convention)")
    p.add_argument("--gamma-on", choices=("equation", "learnable"), default="equation",
                   help="family law: G^gamma multiplies the whole loss as in the paper's eq. (1), or only the "
                        "learnable A, B terms as its text says")
    p.add_argument("--delta", type=float, default=1e-3,
                   help="Huber threshold on log residuals (default: the paper's 1e-3)")
    p.add_argument("--delta-scan", action="store_true",
                   help="also refit at delta = 1e-4, 1e-3, 1e-2, 1e-1 and print how the parameters move")
    p.add_argument("--fix", type=_fixed_arg, action="append", default=[], metavar="NAME=VALUE",
                   help="hold a parameter fixed instead of fitting it; log-space names (e, a, b, alpha, beta, "
                        "gamma; alpha_P, beta_Q, a for branch) or E, A, B. E.g. --fix a=6 --fix b=8 "
                        "reproduces the paper's fit if its A, B never left their grid starts")
    p.add_argument("--branch-Dd", type=float, default=None, metavar="D_d",
                   help="branch law: the D_d held fixed while alpha_P, beta_Q and a are fitted (the three are "
                        "identifiable only as alpha_P D_d^a, beta_Q D_d^a and a; default: the paper's 2.75e6)")
    p.add_argument("--branch-D-unit", type=float, default=None, metavar="TOKENS",
                   help="branch law: tokens per unit of D and D_d (default: 1e3, the unit that reproduces the "
                        "paper's curves; see docs/fitting.md)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="bootstrap replicates for CIs, each re-optimised (default: 0 = no CIs)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed")
    p.add_argument("--json", metavar="OUT", help="write the result as strict JSON to this file")
    p.add_argument("--plots", metavar="DIR", help="draw the fit's figures (PNG + PDF) into this folder")
    p.add_argument("--profile", metavar="DIR",
                   help="family law: profile the objective over (ln A, ln B) and write identifiability.png/.json "
                        "into this folder")
    p.add_argument("--paper-figures", metavar="DIR",
                   help="draw the paper's figures from its constants into this folder (RUNS not needed)")
    p.add_argument("--keep", type=int, default=256,
                   help="best screened starts to optimise fully (default: 256; 0 = every start)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while fitting")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _fit_config(args):
    from fitting.fitter import FitConfig
    from fitting.laws import PAPER_BRANCH
    return FitConfig(grid=args.grid, keep=args.keep or None, progress=not args.no_progress, threads=args.threads,
                     branch_D_d=args.branch_Dd or PAPER_BRANCH.D_d, delta=args.delta, gamma_on=args.gamma_on,
                     fixed=dict(args.fix), branch_D_unit=args.branch_D_unit or PAPER_BRANCH.D_unit)


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in params.items())


def _check_or_fail(law: str, runs, fixed: dict, source: str) -> None:
    from fitting.checks import design_problems, refusal_line
    errors, warnings = design_problems(law, runs, fixed)
    if errors:
        fail(refusal_line(law, runs, errors, source))
    for w in warnings:
        warn(FIT, w)


def _dense_predictor(rows, args):
    """L_dense for run records without exit_dense_loss: a dense-law fit to the file's G == 1 runs."""
    from dataclasses import replace

    from fitting import data, fitter
    from fitting.laws import LawParams, dense_loss
    try:
        dense = data.family_runs(rows, dense_only=True, n_kind=args.n_kind)
    except data.DataError as e:
        fail(f"{e}: the branch law needs L_dense, from exit_dense_loss or a dense-law fit")
    _check_or_fail("dense", dense, {}, "L_dense for the branch law needs a dense-law fit to the G == 1 runs")
    r = fitter.fit("dense", dense.lawdata(), replace(_fit_config(args), fixed={}))
    p = LawParams(**r.params, gamma=0.0)
    print(f"L_dense from a dense-law fit to {dense.n} G == 1 runs: {_fmt(r.params)}")
    for w in r.warnings:
        warn(FIT, f"dense fit for L_dense: {w}")
    return lambda N, D: dense_loss(N, D, p)


def _fit_runs(args):
    from fitting import data
    rows = data.read_rows(args.runs)
    if args.law in ("family", "dense"):
        return data.family_runs(rows, dense_only=args.law == "dense", n_kind=args.n_kind)
    dense_predict = None
    if rows and "P" not in rows[0] and not all("exit_dense_loss" in r for r in rows if r.get("G", 1) > 1):
        dense_predict = _dense_predictor(rows, args)
    return data.branch_runs(rows, dense_predict, n_kind=args.n_kind)


def _validate_args(args) -> None:
    if not args.runs:
        fail("RUNS is required (or give --paper-figures DIR alone)")
    if args.bootstrap < 0 or args.keep < 0 or args.threads < 1:
        fail("--bootstrap and --keep must be >= 0 and --threads >= 1")
    for flag, v in (("--branch-Dd", args.branch_Dd), ("--branch-D-unit", args.branch_D_unit), ("--delta", args.delta)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            fail(f"{flag} must be a positive number, got {v}")
    if args.profile and args.law != "family":
        fail("--profile profiles the family law over (ln A, ln B); use it with --law family")


def _fit_plots(args, runs, result) -> list[Path]:
    import torch

    from fitting import figures
    from fitting.fitter import make_law
    from fitting.laws import BranchParams, LawParams
    cfg = _fit_config(args)
    out = Path(args.plots)
    law = make_law(args.law, cfg)
    pred, _ = law.predict(torch.tensor(result.x[None]), runs.lawdata())
    resid = (pred[0] - runs.lawdata().y).numpy()
    paths = figures.residuals(resid, runs, out, f"residuals_{args.law}")
    if args.law == "branch":
        b = BranchParams(**{k: result.params[k] for k in ("alpha_P", "beta_Q", "D_d", "a")},
                         D_unit=cfg.branch_D_unit)
        return paths + figures.branch_fit(b, out, runs)
    p = LawParams(**{**result.params, "gamma": result.params.get("gamma", 0.0)}, gamma_on=args.gamma_on,
                  n_kind=args.n_kind)
    paths += figures.isoloss(p, out, int(np.max(runs.G)), runs)
    if args.law == "family":
        paths += figures.loss_surfaces(p, out, runs, tuple(int(g) for g in np.unique(runs.G))[:4])
        paths += figures.loss_vs_G(p, out, runs)
    return paths


def _print_result(args, runs, result, out) -> None:
    print(f"{args.law} law on {runs.n} runs ({args.grid} grid, {result.n_starts} starts, "
          f"{result.n_optimised} optimised, {result.seconds['total']:.2f} s): {_fmt(result.params)}")
    if result.fixed:
        print(f"held fixed, not fitted: {_fmt(result.fixed)}")
    print(f"objective (summed Huber, delta={args.delta:g}) = {result.objective:.6g}")
    v = out["validation"]
    if v.get("budgets"):
        print(f"leave-one-budget-out: mean |rel err| {v['mean_abs_rel_err']:.3%}; largest budget: "
              f"mean |rel err| {v['largest_budget_mean_abs_rel_err']:.3%}, "
              f"error of its mean loss {v['largest_budget_rel_err_of_mean']:.3%}")
    for name, (lo, hi) in ((k, v) for k, v in out["ci"].items() if isinstance(v, list)):
        print(f"  {name:>16s}  95% CI [{lo:.6g}, {hi:.6g}]")
    for row in out.get("delta_scan", []):
        print(f"  delta={row['delta']:<8g} {_fmt(row['params'])}")
    for w in result.warnings:
        warn(FIT, w)


def _profile(args, runs, cfg) -> None:
    from fitting import figures
    from fitting.identifiability import profile_ab
    prof = profile_ab(runs, np.arange(0.0, 20.01, 0.5), np.arange(0.0, 20.01, 0.5), cfg)
    out = Path(args.profile)
    figures.identifiability(prof, out)
    _write_json(out / "identifiability.json",
                {"a": prof.a.tolist(), "b": prof.b.tolist(), "objective": prof.f.tolist(), "f_min": prof.f_min,
                 "ab_free": list(prof.ab_free), "scale": prof.scale, "spread_95": prof.spread(),
                 "n_opt_exponent": prof.n_opt_exponent().tolist()}, warn=False)   # nan where alpha = beta = 0
    sp = prof.spread()
    if sp:
        print(f"identifiability: at 95 % the runs allow ln A in [{sp['a'][0]:g}, {sp['a'][1]:g}], ln B in "
              f"[{sp['b'][0]:g}, {sp['b'][1]:g}], N_opt exponent in [{sp['N_opt_exponent'][0]:.3f}, "
              f"{sp['N_opt_exponent'][1]:.3f}]; wrote {out}/identifiability.png")


def fit_main(argv: list[str] | None = None) -> int:
    return run(FIT, lambda: _fit(_fit_parser().parse_args(argv)))


def _fit(args) -> int:
    if args.paper_figures:
        from fitting.figures import paper_figures
        paths = paper_figures(Path(args.paper_figures))
        print(f"wrote {len(paths)} files to {args.paper_figures}")
        if not args.runs:
            return 0
    _validate_args(args)
    from fitting import data, fitter
    try:
        runs = _fit_runs(args)
        cfg = _fit_config(args)
        fixed = fitter.log_fixed(args.law, cfg.fixed)
        fitter.make_law(args.law, cfg)
    except (data.DataError, ValueError) as e:
        fail(str(e))
    _check_or_fail(args.law, runs, fixed, args.runs)
    d = runs.lawdata()
    result = fitter.fit(args.law, d, cfg)
    out = {"law": args.law, "params": result.params, **({"fixed": result.fixed} if result.fixed else {}),
           "objective": result.objective, "n_runs": runs.n, "n_kind": args.n_kind, "gamma_on": args.gamma_on,
           "delta": args.delta, "ci": {}, "validation": fitter.leave_one_budget_out(args.law, d, runs.C, result, cfg),
           "grid": args.grid, "fit": result.summary()}
    if args.bootstrap:
        xs = fitter.bootstrap(args.law, d, result, args.bootstrap, args.seed, cfg)
        out["ci"] = fitter.confidence(args.law, xs, cfg=cfg)
    if args.delta_scan:
        out["delta_scan"] = fitter.delta_scan(args.law, d, cfg=cfg)
    _print_result(args, runs, result, out)
    if args.json:
        _write_json(Path(args.json), out)
    if args.plots:
        try:
            paths = _fit_plots(args, runs, result)
            print(f"wrote {len(paths)} figure files to {args.plots}")
        except (ValueError, OverflowError, OSError) as e:   # the fit and its JSON are kept
            warn(FIT, f"could not draw the figures: {e}")
    if args.profile:
        _profile(args, runs, cfg)
    return 0


# ---- familial-plan -------------------------------------------------------------------------------
def _plan_parser() -> Parser:
    p = Parser(
        prog=PLAN,
        description="Plan a familial model for a training budget and a device/edge/cloud tier file: a "
                    "compute-optimal trunk shaped so every tier's exit is the best model that tier's memory and "
                    "latency allow, tokens, predicted per-exit loss and EL; writes a trainer config.")
    p.add_argument("--flops", type=float, required=True, metavar="C", help="training budget in FLOPs, e.g. 1e20")
    p.add_argument("--tiers", required=True, metavar="FILE",
                   help="YAML or JSON tier file (see examples/tiers.yaml)")
    p.add_argument("--out", metavar="FILE",
                   help="write the trainer config ({model, train}) as JSON here (or YAML if it ends in .yaml); "
                        "the full plan goes next to it as <stem>.plan.json")
    p.add_argument("--law", metavar="JSON",
                   help="fitted law (familial-fit --json output) to use instead of the paper's constants")
    p.add_argument("--dense-side", choices=("matched", "same-tokens", "budget-split"), default="matched",
                   help="dense side of the predicted EL: matched parameter count and compute (the paper's "
                        "words), the family's tokens, or a compute-optimal set sharing the budget")
    p.add_argument("--min-gain", type=float, default=0.02,
                   help="each tier's exit must beat the exit below it by at least this fraction of its loss, "
                        "so no tier serves a near-copy of the previous one")
    p.add_argument("--seq-len", type=int, default=2048, help="training sequence length")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--bytes-per-param", type=float, default=2.0,
                   help="weight bytes per parameter when serving (default: 2 = bf16)")
    return p


def plan_main(argv: list[str] | None = None) -> int:
    return run(PLAN, lambda: _plan(_plan_parser().parse_args(argv)))


def _plan(args) -> int:
    from fitting import planner
    try:
        tiers = planner.load_tiers(args.tiers)
        law = planner.load_law(args.law) if args.law else None
        if not (args.flops > 0 and np.isfinite(args.flops)):
            raise planner.PlanError(f"--flops must be a positive number, got {args.flops}")
        if not (0 <= args.min_gain < 1):
            raise planner.PlanError(f"--min-gain must be in [0, 1), got {args.min_gain}")
        plan = planner.plan(args.flops, tiers, planner.PlanConfig(
            seq_len=args.seq_len, vocab_size=args.vocab, bytes_per_param=args.bytes_per_param,
            dense_side=args.dense_side, min_gain=args.min_gain), law)
    except planner.PlanError as e:
        fail(str(e))
    print(planner.describe(plan))
    if args.out:
        planner.write_outputs(plan, Path(args.out))
        print(f"wrote trainer config to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(fit_main())
