"""Command-line edge of `fitting`: `familial-fit` (runs -> law, CIs, validation, figures) and
`familial-plan` (budget + tiers -> plan + trainer config).

Only argument parsing, printing and file writing live here; the work is in fitter.py, figures.py and
planner.py. Bad input ends with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_EXIT_BAD_INPUT = 2


def _fail(prog: str, msg: str) -> None:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(_EXIT_BAD_INPUT)


# ---- familial-fit --------------------------------------------------------------------------------
def _fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="familial-fit",
        description="Fit a familial scaling law to training runs (Huber(1e-3) on log residuals, summed; "
                    "batched L-BFGS from a grid of starts), with bootstrap CIs and leave-one-budget-out "
                    "validation.")
    p.add_argument("runs", nargs="?", metavar="RUNS",
                   help="JSONL run records (docs/run-record.md) or CSV with a header: N,D,G,loss "
                        "(family/dense; G optional for dense, C optional) or P,Q,D,loss,L_dense (branch)")
    p.add_argument("--law", choices=("family", "branch", "dense"), default="family",
                   help="law to fit: family L(N,D,G), branch L(P,Q,D), or dense L(N,D) on G == 1 runs "
                        "(default: family)")
    p.add_argument("--grid", choices=("paper", "hoffmann"), default="paper",
                   help="grid of L-BFGS starts: paper (1.56M starts for family) or hoffmann (22.5k) "
                        "(default: paper)")
    p.add_argument("--branch-Dd", type=float, default=None, metavar="D_d",
                   help="branch law: the D_d held fixed while alpha_P, beta_Q and a are fitted (the three are "
                        "identifiable only as alpha_P D_d^a, beta_Q D_d^a and a; default: the paper's 2.75e6)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="bootstrap replicates for CIs, each re-optimised (default: 0 = no CIs)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed (default: 0)")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON to this file")
    p.add_argument("--plots", metavar="DIR", help="draw the fit's figures (PNG + PDF) into this folder")
    p.add_argument("--paper-figures", metavar="DIR",
                   help="draw the paper's figures from its constants into this folder (RUNS not needed)")
    p.add_argument("--keep", type=int, default=256,
                   help="best screened starts to optimise fully (default: 256; 0 = every start)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while fitting (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _fit_runs(args):
    from fitting import data
    rows = data.read_rows(args.runs)
    if args.law == "family":
        return data.family_runs(rows)
    if args.law == "dense":
        return data.family_runs(rows, dense_only=True)
    dense_predict = None
    if rows and "P" not in rows[0] and not all("exit_dense_loss" in r for r in rows if r.get("G", 1) > 1):
        dense_predict = _dense_predictor(rows, args)
    return data.branch_runs(rows, dense_predict)


def _dense_predictor(rows, args):
    """L_dense for run records without exit_dense_loss: a dense-law fit to the file's G == 1 runs."""
    from fitting import data, fitter
    from fitting.laws import LawParams, dense_loss
    dense = data.family_runs(rows, dense_only=True)
    r = fitter.fit("dense", dense.lawdata(), _fit_config(args))
    p = LawParams(**r.params, gamma=0.0)
    print(f"L_dense from a dense-law fit to {dense.n} G == 1 runs: {_fmt(r.params)}")
    return lambda N, D: dense_loss(N, D, p)


def _fit_config(args):
    from fitting.fitter import FitConfig
    from fitting.laws import PAPER_BRANCH
    return FitConfig(grid=args.grid, keep=args.keep or None, progress=not args.no_progress,
                     threads=args.threads, branch_D_d=args.branch_Dd or PAPER_BRANCH.D_d)


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in params.items())


def _fit_plots(args, runs, result) -> list[Path]:
    import torch

    from fitting import figures
    from fitting.laws import BranchParams, LawParams
    from fitting.objective import get_law
    out = Path(args.plots)
    law = get_law(args.law, result.fixed.get("D_d"))
    pred, _ = law.predict(torch.tensor(result.x[None]), runs.lawdata())
    resid = (pred[0] - runs.lawdata().y).numpy()
    paths = figures.residuals(resid, runs, out, f"residuals_{args.law}")
    if args.law == "branch":
        return paths + figures.branch_fit(BranchParams(**result.params), out, runs)
    p = LawParams(**{**result.params, "gamma": result.params.get("gamma", 0.0)})
    paths += figures.isoloss(p, out, int(np.max(runs.G)), runs)
    if args.law == "family":
        paths += figures.loss_surfaces(p, out, runs, tuple(int(g) for g in np.unique(runs.G))[:6])
    return paths


def fit_main(argv: list[str] | None = None) -> int:
    args = _fit_parser().parse_args(argv)
    prog = "familial-fit"
    if args.paper_figures:
        from fitting.figures import paper_figures
        paths = paper_figures(Path(args.paper_figures))
        print(f"wrote {len(paths)} files to {args.paper_figures}")
        if not args.runs:
            return 0
    if not args.runs:
        _fail(prog, "RUNS is required (or give --paper-figures DIR alone)")
    if args.bootstrap < 0 or args.keep < 0 or args.threads < 1:
        _fail(prog, "--bootstrap and --keep must be >= 0 and --threads >= 1")
    if args.branch_Dd is not None and not (args.branch_Dd > 0 and np.isfinite(args.branch_Dd)):
        _fail(prog, f"--branch-Dd must be a positive number, got {args.branch_Dd}")
    from fitting import data, fitter
    try:
        runs = _fit_runs(args)
    except data.DataError as e:
        _fail(prog, str(e))
    n_params = {"family": 6, "dense": 5, "branch": 3}[args.law]
    if runs.n <= n_params:
        _fail(prog, f"{runs.n} runs cannot determine {n_params} parameters of the {args.law} law")
    cfg = _fit_config(args)
    d = runs.lawdata()
    result = fitter.fit(args.law, d, cfg)
    out = {"law": args.law, "params": result.params, **({"fixed": result.fixed} if result.fixed else {}),
           "objective": result.objective, "n_runs": runs.n,
           "ci": {}, "validation": fitter.leave_one_budget_out(args.law, d, runs.C, result, cfg),
           "grid": args.grid, "fit": result.summary()}
    if args.bootstrap:
        xs = fitter.bootstrap(args.law, d, result, args.bootstrap, args.seed, cfg)
        out["ci"] = fitter.confidence(args.law, xs, branch_D_d=cfg.branch_D_d)
    print(f"{args.law} law on {runs.n} runs ({args.grid} grid, {result.n_starts} starts, "
          f"{result.n_optimised} optimised, {result.seconds['total']:.2f} s): {_fmt(result.params)}")
    if result.fixed:
        print(f"held fixed, not fitted: {_fmt(result.fixed)}")
    print(f"objective (summed Huber) = {result.objective:.6g}")
    v = out["validation"]
    if v.get("budgets"):
        print(f"leave-one-budget-out: mean |rel err| {v['mean_abs_rel_err']:.3%}; largest budget: "
              f"mean |rel err| {v['largest_budget_mean_abs_rel_err']:.3%}, "
              f"error of its mean loss {v['largest_budget_rel_err_of_mean']:.3%}")
    for name, (lo, hi) in ((k, v) for k, v in out["ci"].items() if isinstance(v, list)):
        print(f"  {name:>16s}  95% CI [{lo:.6g}, {hi:.6g}]")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plots:
        paths = _fit_plots(args, runs, result)
        print(f"wrote {len(paths)} figure files to {args.plots}")
    return 0


# ---- familial-plan -------------------------------------------------------------------------------
def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="familial-plan",
        description="Plan a familial model for a training budget and a device/edge/cloud tier file: "
                    "model shape near the compute-optimal N, exit layers that fit each tier's memory and "
                    "latency target, tokens, predicted per-exit loss and EL; writes a trainer config.")
    p.add_argument("--flops", type=float, required=True, metavar="C", help="training budget in FLOPs, e.g. 1e20")
    p.add_argument("--tiers", required=True, metavar="FILE",
                   help="YAML or JSON tier file (see examples/tiers.yaml)")
    p.add_argument("--out", metavar="FILE",
                   help="write the trainer config ({model, train}) as JSON here (or YAML if it ends in .yaml); "
                        "the full plan goes next to it as <stem>.plan.json")
    p.add_argument("--law", metavar="JSON",
                   help="fitted law (familial-fit --json output) to use instead of the paper's constants")
    p.add_argument("--seq-len", type=int, default=2048, help="training sequence length (default: 2048)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: 32000)")
    p.add_argument("--bytes-per-param", type=float, default=2.0,
                   help="weight bytes per parameter when serving (default: 2 = bf16)")
    return p


def plan_main(argv: list[str] | None = None) -> int:
    args = _plan_parser().parse_args(argv)
    prog = "familial-plan"
    from fitting import planner
    try:
        tiers = planner.load_tiers(args.tiers)
        law = planner.load_law(args.law) if args.law else None
        if not (args.flops > 0 and np.isfinite(args.flops)):
            raise planner.PlanError(f"--flops must be a positive number, got {args.flops}")
        plan = planner.plan(args.flops, tiers, planner.PlanConfig(
            seq_len=args.seq_len, vocab_size=args.vocab, bytes_per_param=args.bytes_per_param), law)
    except planner.PlanError as e:
        _fail(prog, str(e))
    print(planner.describe(plan))
    if args.out:
        planner.write_outputs(plan, Path(args.out))
        print(f"wrote trainer config to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(fit_main())
