"""Figures of the IsoFLOP study from its runs.jsonl and a family-law fit (`familial-fit --json`).

    python benchmarks/isoflop/figures.py benchmarks/results/isoflop/runs.jsonl \
        --fit benchmarks/results/isoflop/fit.json --out benchmarks/results/isoflop

writes (PNG)
  isoflop_curves.png     one panel per G: loss against N at each budget, runs as markers (dense
                         baselines hollow), the fitted law L(N, C / flops_per_token(N), G) as lines
                         and its minimum as a star
  loss_vs_G.png          one panel per budget: each size's loss against G (markers), the law at the
                         run's own (N, D, G) (dashed) and the law's compute-optimal loss per G (black)
  efficiency_leverage.png  EL(C) of the fitted law for each G > 1 against the paper's constants, loss
                         form; the study's budgets marked
flops_per_token(N) for the curves is interpolated (log-log, quadratic) from the runs of that G, so the
lines use the same full FLOP count the runs were planned with. Nothing here fits: the law comes from
fit.json; bad input ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fitting.laws import PAPER, LawParams, family_law_loss  # noqa: E402
from fitting.leverage import efficiency_leverage  # noqa: E402

_STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
          "axes.spines.right": False, "font.size": 9, "legend.fontsize": 7, "legend.frameon": False}


class FigureError(ValueError):
    pass


def read_runs(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise FigureError(f"{path}: {e.strerror}") from None
    runs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            r["sweep"]["budget"], r["sweep"]["role"]  # noqa: B018 - a sweep record has both
        except (ValueError, KeyError, TypeError):
            raise FigureError(f"{path}:{i}: not a sweep run record (familial-train sweep writes them)") from None
        runs.append(r)
    if not runs:
        raise FigureError(f"{path}: no runs")
    return runs


def read_law(path: Path) -> LawParams:
    try:
        doc = json.loads(path.read_text())
        p = doc["params"]
        return LawParams(E=p["E"], A=p["A"], alpha=p["alpha"], B=p["B"], beta=p["beta"], gamma=p.get("gamma", 0.0),
                         source=str(path))
    except OSError as e:
        raise FigureError(f"{path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise FigureError(f"{path}: not a familial-fit --json result of the family (or dense) law") from None


def fpt_curve(runs: list[dict], G: int):
    """log-log quadratic (or lower, with fewer shapes) through (N, flops_per_token) of the runs of this G."""
    pts = sorted({(r["N"], r["flops_per_token"]) for r in runs if r["G"] == G})
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    coef = np.polyfit(x, y, min(2, len(pts) - 1)) if len(pts) > 1 else np.array([0.0, y[0]])
    return lambda N: np.exp(np.polyval(coef, np.log(N)))


def _budgets(runs):
    return sorted({r["sweep"]["budget"] for r in runs})


def isoflop_curves(runs: list[dict], p: LawParams, out: Path) -> Path:
    Gs = sorted({r["G"] for r in runs if r["sweep"]["role"] == "grid"})
    budgets = _budgets(runs)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    with plt.rc_context(_STYLE):
        cols = min(4, len(Gs))
        rows = -(-len(Gs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), sharey=True, squeeze=False)
        for ax, G in zip(axes.flat, Gs):
            f = fpt_curve(runs, G)
            for C, c in zip(budgets, colors):
                mine = [r for r in runs if r["G"] == G and r["sweep"]["budget"] == C]
                if not mine:
                    continue
                Ns = np.array([r["N"] for r in mine])
                grid = np.logspace(np.log10(Ns.min() / 1.5), np.log10(Ns.max() * 1.5), 200)
                L = family_law_loss(grid, C / f(grid), G, p)
                ax.plot(grid, L, color=c, lw=1.3, label=f"C={C:.0e}")
                k = int(np.argmin(L))
                ax.plot(grid[k], L[k], "*", color=c, ms=9, mec="k", mew=0.4)
                for role, face in (("grid", c), ("dense", "none")):
                    sel = [r for r in mine if r["sweep"]["role"] == role]
                    ax.scatter([r["N"] for r in sel], [r["loss"] for r in sel], s=18, facecolor=face,
                               edgecolor=c if role == "dense" else "k", lw=0.6, zorder=3)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # less than a decade: labels overlap
            ax.set_title(f"G = {G}")
            ax.set_xlabel("N (non-embedding parameters)")
        for ax in axes[:, 0]:
            ax.set_ylabel("validation loss (mean over exits)")
        for ax in list(axes.flat)[len(Gs):]:
            ax.set_visible(False)
        axes.flat[0].legend(loc="upper right")
        fig.suptitle("IsoFLOP curves: runs (filled: grid, hollow: dense baselines), fitted law (lines), "
                     "law minimum (stars)", fontsize=9)
        fig.tight_layout()
        path = out / "isoflop_curves.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return path


def loss_vs_G(runs: list[dict], p: LawParams, out: Path) -> Path:
    grid = [r for r in runs if r["sweep"]["role"] == "grid"]
    budgets = _budgets(grid)
    Gs = sorted({r["G"] for r in grid})
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(budgets), figsize=(3.3 * len(budgets), 3.0), squeeze=False)
        for ax, C in zip(axes[0], budgets):
            here = [r for r in grid if r["sweep"]["budget"] == C]
            shapes = sorted({(r["config"]["model"]["d_model"], r["n_layers"]) for r in here},
                            key=lambda s: min(r["N"] for r in here if (r["config"]["model"]["d_model"], r["n_layers"]) == s))
            colors = plt.cm.plasma(np.linspace(0, 0.85, len(shapes)))
            for (d, L), c in zip(shapes, colors):
                rs = sorted((r for r in here if (r["config"]["model"]["d_model"], r["n_layers"]) == (d, L)),
                            key=lambda r: r["G"])
                g = [r["G"] for r in rs]
                ax.plot(g, [r["loss"] for r in rs], "o", color=c, ms=5, label=f"d{d}-L{L} ({rs[0]['N'] / 1e6:.2g}M)")
                ax.plot(g, [float(family_law_loss(r["N"], r["D"], r["G"], p)) for r in rs], "--", color=c, lw=1)
            best = []
            for G in Gs:
                f = fpt_curve(grid, G)
                Ns = np.logspace(np.log10(min(r["N"] for r in here) / 2), np.log10(max(r["N"] for r in here) * 2), 300)
                best.append(float(np.min(family_law_loss(Ns, C / f(Ns), G, p))))
            ax.plot(Gs, best, "k-", lw=1.4, label="law, compute-optimal")
            ax.set_xticks(Gs)
            ax.set_xlabel("G (exits)")
            ax.set_title(f"C = {C:.0e} FLOPs")
            ax.legend(loc="upper left", fontsize=6)
        axes[0, 0].set_ylabel("validation loss (mean over exits)")
        fig.tight_layout()
        path = out / "loss_vs_G.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return path


def el_figure(runs: list[dict], p: LawParams, out: Path) -> Path:
    Gs = [G for G in sorted({r["G"] for r in runs}) if G > 1] or [2, 3, 4]
    C = np.logspace(14, 24, 120)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(Gs)))
        for G, c in zip(Gs, colors):
            ax.plot(C, efficiency_leverage(C, G, p), color=c, lw=1.5, label=f"G={G}, fitted")
            ax.plot(C, efficiency_leverage(C, G, PAPER), color=c, lw=1, ls="--", label=f"G={G}, paper")
        for b in _budgets(runs):
            ax.axvline(b, color="0.6", lw=0.6, ls=":")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel("EL = L_dense-set / L_family")
        ax.set_title("Efficiency Leverage (loss form; dotted: the study's budgets)")
        ax.legend(ncol=2)
        fig.tight_layout()
        path = out / "efficiency_leverage.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Draw the IsoFLOP study's figures from runs.jsonl and a family-law fit.")
    ap.add_argument("runs", help="the sweep's runs.jsonl")
    ap.add_argument("--fit", required=True, help="familial-fit --law family --json output")
    ap.add_argument("--out", default=".", help="folder for the PNG files")
    args = ap.parse_args(argv)
    try:
        runs = read_runs(Path(args.runs))
        p = read_law(Path(args.fit))
    except FigureError as e:
        print(f"figures.py: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (isoflop_curves(runs, p, out), loss_vs_G(runs, p, out), el_figure(runs, p, out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
