"""The numbers docs/fitting.md quotes about the paper's laws, measured in one run (CPU, ~3 minutes).

  identifiability  the paper's design (1-4B, 1e19-1e21, G 1-4) drawn from its law with 0.3 % and 1 %
                   log-normal noise, 5 seeds each: free fit against a, b frozen at 6 and 8, and the 95 %
                   region of the (ln A, ln B) profile
  delta            the Huber delta from 1e-4 to 1e-1 on the 258-run 1 %-noise sweep and on the paper design
  el               EL (loss / compute form) at 1e19-1e21 for G = 3..6, three dense sides, both G^gamma
                   readings, and where EL crosses 1
  branch           branch-law recovery from noisy per-exit losses with D in thousands of tokens
  planner          the plans at 1e19, 1e20 and 1e22 FLOPs on examples/tiers.yaml
Writes benchmarks/results/fit_fidelity.json (with machine and date) and prints short tables.
    python benchmarks/fit_fidelity.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitting import planner  # noqa: E402
from fitting.fitter import FitConfig, delta_scan, fit  # noqa: E402
from fitting.identifiability import frozen_vs_free, paper_design_runs, profile_ab  # noqa: E402
from fitting.laws import PAPER, PAPER_BRANCH  # noqa: E402
from fitting.leverage import DENSE_SIDES, crossing_budget, efficiency_leverage, efficiency_leverage_compute  # noqa: E402
from fitting.synthetic import branch_sweep, isoflop_sweep  # noqa: E402

KEYS = ("E", "A", "alpha", "B", "beta", "gamma", "N_opt_exponent", "N_opt@1e21")


def identifiability(seeds, noises) -> dict:
    out = {}
    cfg = FitConfig(grid="paper")
    for noise in noises:
        rows = []
        for seed in seeds:
            runs = paper_design_runs(noise=noise, seed=seed)
            r = frozen_vs_free(runs, cfg=cfg)
            prof = profile_ab(runs, np.arange(0.0, 16.01, 0.5), np.arange(6.0, 10.01, 0.25), cfg)
            rows.append({"seed": seed, "free": {k: r["free"][k] for k in KEYS},
                         "frozen": {k: r["frozen"][k] for k in KEYS}, "lr_stat": r["lr_stat"],
                         "rejected_at_95": r["rejected_at_95"], "region_95": prof.spread(),
                         "ab_free": list(prof.ab_free)})
        out[f"{noise:g}"] = rows
    return out


def delta(quick: bool) -> dict:
    deltas = (1e-4, 1e-3, 1e-2, 1e-1)
    sweep = isoflop_sweep(noise=0.01, seed=1)
    design = paper_design_runs(noise=0.01, seed=0)
    grid = "hoffmann" if quick else "paper"
    return {"sweep_258_runs_1pct": delta_scan("family", sweep.lawdata(), deltas, FitConfig(grid=grid)),
            "paper_design_1pct": delta_scan("family", design.lawdata(), deltas, FitConfig(grid=grid))}


def el() -> dict:
    C = np.array([1e19, 1e20, 1e21])
    out = {}
    for reading in ("equation", "learnable"):
        p = PAPER.replace(gamma_on=reading)
        for side in DENSE_SIDES:
            out[f"{reading}/{side}"] = {
                f"G={G}": {"loss_form": efficiency_leverage(C, G, p, side).tolist(),
                           "compute_form": efficiency_leverage_compute(C, G, p, side).tolist(),
                           "crosses_1_at": crossing_budget(G, p, side)} for G in (3, 4, 5, 6)}
    return {"budgets": C.tolist(), "table": out}


def branch(seeds=(5, 6, 7)) -> dict:
    out = {}
    for noise in (0.0, 0.001, 0.01):
        rows = []
        for seed in seeds:
            runs = branch_sweep(noise=noise, seed=seed)
            r = fit("branch", runs.lawdata(), FitConfig())
            rows.append({"seed": seed, "params": r.params, "warnings": r.warnings})
        out[f"{noise:g}"] = rows
    return {"truth": PAPER_BRANCH.as_dict(), "D_unit": PAPER_BRANCH.D_unit, "fits": out}


def plans() -> dict:
    tiers = planner.load_tiers(ROOT / "examples" / "tiers.yaml")
    out = {}
    for C in (1e19, 1e20, 1e22):
        pl = planner.plan(C, tiers)
        out[f"{C:.0e}"] = {"N": pl["N"], "d_model": pl["trainer_config"]["model"]["d_model"],
                           "n_layers": pl["trainer_config"]["model"]["n_layers"],
                           "exits_after_layer": [t["layers"][1] for t in pl["tiers"]],
                           "losses": pl["predicted"]["exit_losses"],
                           "gains": [t["gain_over_previous"] for t in pl["tiers"]],
                           "memory_gb": [t["memory_gb"] for t in pl["tiers"]],
                           "latency_ms": [t["latency_ms"] for t in pl["tiers"]],
                           "family_loss": pl["predicted"]["family_loss"],
                           "family_law_loss": pl["predicted"]["family_law_loss"],
                           "EL": pl["predicted"]["EL_loss_form"], "notes": pl["notes"]}
    return out


def _print(doc: dict) -> None:
    print("identifiability (paper design): noise  seed  free alpha/E/N_opt-exp  frozen(6,8) alpha/E/N_opt-exp  LR  "
          "95% ln A range  N_opt-exp range")
    for noise, rows in doc["identifiability"].items():
        for r in rows:
            f, z, g = r["free"], r["frozen"], r["region_95"]
            print(f"  {noise:>6s} {r['seed']:>4d}  {f['alpha']:.3f}/{f['E']:.3f}/{f['N_opt_exponent']:.3f}  "
                  f"{z['alpha']:.3f}/{z['E']:.3f}/{z['N_opt_exponent']:.3f}  {r['lr_stat']:6.2f}  "
                  f"[{g['a'][0]:g}, {g['a'][1]:g}]  [{g['N_opt_exponent'][0]:.3f}, {g['N_opt_exponent'][1]:.3f}]")
    print("plans (examples/tiers.yaml): exits after layer / gains / family loss vs eq. (1)")
    for C, pl in doc["planner"].items():
        print(f"  {C}: {pl['exits_after_layer']} of {pl['n_layers']} (d {pl['d_model']}), gains "
              f"{[round(g, 3) if g is not None else None for g in pl['gains']]}, "
              f"{pl['family_loss']:.4f} vs {pl['family_law_loss']:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two seeds, hoffmann grid for the delta scan")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fit_fidelity.json"), help="JSON output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    seeds = (0, 1) if args.quick else (0, 1, 2, 3, 4)
    doc = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
           "python": platform.python_version(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "identifiability": identifiability(seeds, (0.003, 0.01)), "delta": delta(args.quick), "el": el(),
           "branch": branch(), "planner": plans()}
    doc["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, allow_nan=False, default=float) + "\n")
    _print(doc)
    print(f"wrote {args.out} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
