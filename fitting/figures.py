"""The paper's figures, drawn with matplotlib (Agg) as PNG + PDF pairs.

  loss_surfaces   Fig. 1: IsoFLOP loss curves L(N) at fixed budgets, one panel per G (+ runs if given)
  isoloss         Fig. 2: isoloss contours over (N, D) with IsoFLOP lines and the efficient frontier
  branch_fit      Figs. 5-6: branch law against per-exit data (loss ratio to dense vs depth; pred vs obs)
  efficiency      Fig. 7: Efficiency Leverage against FLOPs for G in {3, 4, 5, 6}, both forms
  residuals       log residuals by compute budget and by G
`paper_figures(dir)` draws the first four from the paper's constants with no data. Every function takes
the law's parameters; none fits anything or reads files.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fitting.data import Runs  # noqa: E402
from fitting.laws import (PAPER, PAPER_BRANCH, BranchParams, LawParams, branch_loss,  # noqa: E402
                          efficiency_leverage, efficiency_leverage_compute, family_loss, frontier)

_STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
          "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8, "legend.frameon": False}


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _budgets(runs: Runs | None) -> np.ndarray:
    if runs is None:
        return np.array([1e18, 1e19, 1e20, 1e21])
    keys = np.round(np.log10(runs.C) / 0.05)
    return np.array([np.median(runs.C[keys == k]) for k in np.unique(keys)])


def loss_surfaces(p: LawParams, out: Path, runs: Runs | None = None, Gs=(1, 2, 3, 4, 5, 6)) -> list[Path]:
    """Fig. 1: IsoFLOP curves of L(N, C/6N, G) per G; runs (if any) as points coloured by budget."""
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(2, 3, figsize=(10, 5.6), sharex=True, sharey=True)
        budgets = _budgets(runs)
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
        for ax, G in zip(axes.flat, Gs):
            for C, c in zip(budgets, colors):
                n_opt, _ = frontier(C, p)
                N = n_opt * np.logspace(-1.2, 1.2, 200)
                ax.plot(N, family_loss(N, C / (6 * N), G, p), color=c, lw=1.4, label=f"C={C:.0e}")
                ax.plot(n_opt, family_loss(n_opt, C / (6 * n_opt), G, p), "o", color=c, ms=3, mfc="white")
                if runs is not None:
                    m = (runs.G == G) & (np.abs(np.log10(runs.C / C)) < 0.025)
                    ax.scatter(runs.N[m], runs.loss[m], s=10, color=c, edgecolor="k", lw=0.3, zorder=3)
            ax.set_xscale("log")
            ax.set_title(f"G = {G}")
        for ax in axes[-1]:
            ax.set_xlabel("non-embedding parameters N")
        for ax in axes[:, 0]:
            ax.set_ylabel("mean exit loss L")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.suptitle("IsoFLOP loss curves by granularity (open circles: compute-optimal N)")
        fig.tight_layout(rect=(0, 0, 0.9, 1))
        fig.legend(handles, labels, loc="center right", title="budget")
        return _save(fig, out, "fig1_loss_surfaces")


def isoloss(p: LawParams, out: Path, G: int = 4, runs: Runs | None = None) -> list[Path]:
    """Fig. 2: contours of log L(N, D, G) with IsoFLOP lines (C = 6ND) and the efficient frontier."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(6.2, 4.8))
        N = np.logspace(7, 11, 300)
        D = np.logspace(8, 13, 300)
        NN, DD = np.meshgrid(N, D)
        L = family_loss(NN, DD, G, p)
        levels = np.geomspace(L.min(), L.max(), 16)
        cs = ax.contourf(NN, DD, L, levels=levels, cmap="viridis")
        ax.contour(NN, DD, L, levels=levels, colors="k", linewidths=0.25, alpha=0.6)
        fig.colorbar(cs, ax=ax, label=f"loss L(N, D, G={G})", format="%.2f")
        for C in 10.0 ** np.arange(17, 24):
            ax.plot(N, C / (6 * N), color="w", lw=0.9, ls=(0, (2, 2)))
            n = max(N[0] * 1.15, C / (6 * D[-1] / 1.6))            # label where the line enters the plot
            if n <= N[-1] / 3 and C / (6 * n) >= D[0] * 2:
                ax.text(n, C / (6 * n), f"{C:.0e}", fontsize=7, ha="left", va="center",
                        bbox={"fc": "w", "ec": "none", "alpha": 0.8, "pad": 1})
        Cs = np.logspace(16, 25, 100)
        n_opt, d_opt = frontier(Cs, p)
        ax.plot(n_opt, d_opt, color="crimson", lw=2.4, label="efficient frontier (C = 6ND)")
        if runs is not None:
            m = runs.G == G
            ax.scatter(runs.N[m], runs.D[m], s=10, color="w", edgecolor="k", lw=0.4, label=f"runs (G={G})",
                       zorder=3)
        ax.set(xscale="log", yscale="log", xlim=(N[0], N[-1]), ylim=(D[0], D[-1]),
               xlabel="non-embedding parameters N", ylabel="training tokens D",
               title="Isoloss contours, IsoFLOP lines (dashed) and the efficient frontier")
        ax.legend(loc="lower right", frameon=True, facecolor="w", framealpha=0.9)
        ax.grid(False)
        fig.tight_layout()
        return _save(fig, out, "fig2_isoloss_frontier")


def branch_fit(b: BranchParams, out: Path, runs: Runs | None = None) -> list[Path]:
    """Figs. 5-6: L / L_dense against exit depth Q per upstream-branch count P; predicted vs observed."""
    with plt.rc_context(_STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        Dmed = float(np.median(runs.D)) if runs is not None else 1e10
        Q = np.linspace(0.1, 1.0, 100)
        Ps = np.unique(runs.P).astype(int) if runs is not None else np.arange(6)
        colors = plt.cm.plasma(np.linspace(0, 0.85, max(len(Ps), 1)))
        for P, c in zip(Ps, colors):
            a1.plot(Q, branch_loss(P, Q, Dmed, 1.0, b), color=c, lw=1.3, label=f"P={P}")
            if runs is not None:
                m = runs.P == P
                # move each point to D = Dmed along the law's own D factor, so points and curves compare
                to_med = (1 + b.D_d / Dmed) / (1 + b.D_d / runs.D[m])
                a1.scatter(runs.Q[m], runs.loss[m] / runs.L_dense[m] * to_med, s=9, color=c, edgecolor="k",
                           lw=0.3)
        a1.set(xlabel="exit depth fraction Q = l_g / L", ylabel="L_branch / L_dense",
               title=f"Branch law at D = {Dmed:.1e}" + (" (runs moved to it by the D term)" if runs else ""))
        a1.legend(ncol=2)
        if runs is not None:
            pred = branch_loss(runs.P, runs.Q, runs.D, runs.L_dense, b)
            a2.scatter(runs.loss, pred, s=9, c=runs.P, cmap="plasma", edgecolor="k", lw=0.3)
            lo, hi = min(runs.loss.min(), pred.min()), max(runs.loss.max(), pred.max())
            a2.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            a2.set(xlabel="observed exit loss", ylabel="branch-law prediction", title="Predicted vs observed")
        else:
            D = np.logspace(8, 12, 100)
            for P, c in zip(Ps, colors):
                a2.plot(D, branch_loss(P, 0.5, D, 1.0, b), color=c, lw=1.3, label=f"P={P}")
            a2.set(xscale="log", xlabel="training tokens D", ylabel="L_branch / L_dense",
                   title="Branch penalty against data (Q = 0.5)")
        fig.tight_layout()
        return _save(fig, out, "fig5_6_branch_law")


def efficiency(p: LawParams, out: Path, Gs=(3, 4, 5, 6)) -> list[Path]:
    """Fig. 7: EL (loss form and compute form) against training FLOPs."""
    with plt.rc_context(_STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        C = np.logspace(17, 24, 60)
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(Gs)))
        for G, c in zip(Gs, colors):
            a1.plot(C, efficiency_leverage(C, G, p), color=c, lw=1.6, label=f"G={G}")
            a2.plot(C, efficiency_leverage_compute(C, G, p), color=c, lw=1.6, label=f"G={G}")
        for ax in (a1, a2):
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xlabel("training FLOPs C")
            ax.legend()
        a1.set(ylabel="EL = L_dense-set / L_family", title="Efficiency Leverage, loss form")
        a2.set(ylabel="EL = C_dense-set / C", yscale="log", title="Efficiency Leverage, compute form")
        a2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        a2.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        fig.tight_layout()
        return _save(fig, out, "fig7_efficiency_leverage")


def residuals(log_resid: np.ndarray, runs: Runs, out: Path, name: str = "residuals") -> list[Path]:
    """Log residuals (pred - obs) by compute budget and by G (or by P + 1 for branch rows)."""
    with plt.rc_context(_STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        a1.scatter(runs.C, log_resid, s=9, c=np.log(runs.G), cmap="viridis", edgecolor="k", lw=0.2)
        a1.set(xscale="log", xlabel="compute budget C (FLOPs)", ylabel="log residual (pred - obs)",
               title="Residuals by budget")
        groups = np.unique(runs.G)
        a2.boxplot([log_resid[runs.G == g] for g in groups])
        a2.set_xticks(range(1, len(groups) + 1), [f"{g:g}" for g in groups])
        a2.set(xlabel="G (branch rows: exit index)", title="Residuals by G")
        for ax in (a1, a2):
            ax.axhline(0.0, color="k", lw=0.8)
        fig.tight_layout()
        return _save(fig, out, name)


def paper_figures(out: Path, p: LawParams = PAPER, b: BranchParams = PAPER_BRANCH) -> list[Path]:
    """Figs. 1, 2, 5-6 and 7 from the paper's constants, without data."""
    out = Path(out)
    return loss_surfaces(p, out) + isoloss(p, out) + branch_fit(b, out) + efficiency(p, out)
