"""The paper's figures, drawn with matplotlib (Agg) as PNG + PDF pairs.

  loss_surfaces   Fig. 1: IsoFLOP loss curves L(N) at fixed budgets, one panel per G (+ runs if given)
  isoloss         Fig. 2: isoloss contours over (N, D) with IsoFLOP lines and the efficient frontier
  branch_fit      Figs. 5-6: branch law against per-exit data (penalty L - L_dense vs D per (P, Q); pred vs obs)
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


def _branch_pairs(runs: Runs | None) -> list[tuple[int, int]]:
    """(P, Q) pairs to draw: Q = 1.. at P = 0 and P = 1.. at Q = 0 (the paper's two sweeps), up to 5 each."""
    if runs is None:
        return [(0, q) for q in range(1, 6)] + [(p, 0) for p in (1, 3, 5)]
    have = {(int(p), int(q)) for p, q in zip(runs.P, runs.Q)} - {(0, 0)}
    qs = sorted(q for p, q in have if p == 0)
    ps = sorted(p for p, q in have if q == 0)
    pairs = [(0, q) for q in qs[:5]] + [(p, 0) for p in ps[::max(1, len(ps) // 3)][:3]]
    return pairs or sorted(have)[:8]


def branch_fit(b: BranchParams, out: Path, runs: Runs | None = None, p: LawParams = PAPER) -> list[Path]:
    """Figs. 5-6: the branch penalty L - L_dense against D per (P, Q); predicted vs observed exit loss.

    Without runs the right panel shows the penalty in % of the dense loss along the compute-optimal
    frontier of `p`, for each exit of a 6-exit family (no data is drawn)."""
    with plt.rc_context(_STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4.2))
        pairs = _branch_pairs(runs)
        D = np.logspace(8, 12, 100) if runs is None else np.geomspace(runs.D.min() / 1.5, runs.D.max() * 1.5, 100)
        colors = plt.cm.viridis(np.linspace(0, 0.85, sum(P == 0 for P, _ in pairs)))
        warm = plt.cm.autumn(np.linspace(0, 0.6, max(1, sum(P > 0 for P, _ in pairs))))
        hidden = 0
        for k, (P, Q) in enumerate(pairs):
            c = colors[k] if P == 0 else warm[k - len(colors)]
            a1.plot(D, branch_loss(P, Q, D, 0.0, b), color=c, lw=1.4, ls="-" if P == 0 else "--",
                    label=f"P={P}, Q={Q}")
            if runs is not None:
                m = (runs.P == P) & (runs.Q == Q)
                pen = runs.loss[m] - runs.L_dense[m]
                hidden += int(np.sum(pen <= 0))
                a1.scatter(runs.D[m][pen > 0], pen[pen > 0], s=12, color=c, edgecolor="k", lw=0.3, zorder=3)
        title = f"Branch penalty (alpha_P={b.alpha_P:.3g}, beta_Q={b.beta_Q:.3g}, D_d={b.D_d:.3g}, a={b.a:.3g})"
        a1.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="L - L_dense (nats)",
               title=title + (f"\n{hidden} runs with L <= L_dense not shown" if hidden else ""))
        a1.legend(ncol=2, title="solid: exits after (Q); dashed: before (P)", title_fontsize=7)
        if runs is not None:
            pred = branch_loss(runs.P, runs.Q, runs.D, runs.L_dense, b)
            a2.scatter(runs.loss, pred, s=10, c=runs.Q, cmap="viridis", edgecolor="k", lw=0.3)
            lo, hi = min(runs.loss.min(), pred.min()), max(runs.loss.max(), pred.max())
            a2.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            rms = lambda v: float(np.sqrt(np.mean((v / runs.loss - 1) ** 2)))
            a2.text(0.03, 0.97, f"rms rel. error: branch law {rms(pred):.3%}\n"
                    f"dense loss alone (L_dense) {rms(runs.L_dense):.3%}", transform=a2.transAxes,
                    va="top", fontsize=8, bbox={"fc": "w", "ec": "0.7"})
            a2.set(xlabel="observed exit loss", ylabel="branch-law prediction",
                   title="Predicted vs observed (colour: Q, exits after)")
        else:
            C = np.logspace(17, 24, 100)
            n, d = frontier(C, p)
            G = 6
            cmap = plt.cm.plasma(np.linspace(0, 0.85, G))
            for g in range(G):
                Ld = family_loss(n * (g + 1) / G, d, 1.0, p)
                a2.plot(C, 100 * (branch_loss(g, G - 1 - g, d, Ld, b) / Ld - 1), color=cmap[g], lw=1.4,
                        label=f"exit {g + 1} (P={g}, Q={G - 1 - g})")
            a2.set(xscale="log", yscale="log", xlabel="training FLOPs C (compute-optimal N, D)",
                   ylabel="(L - L_dense) / L_dense  (%)", title=f"Penalty per exit of a G = {G} family")
            a2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            a2.legend()
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
    """Log residuals (pred - obs) by compute budget and by G (branch rows: the family's G = P + Q + 1)."""
    with plt.rc_context(_STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        a1.scatter(runs.C, log_resid, s=9, c=np.log(runs.G), cmap="viridis", edgecolor="k", lw=0.2)
        a1.set(xscale="log", xlabel="compute budget C (FLOPs)", ylabel="log residual (pred - obs)",
               title="Residuals by budget")
        groups = np.unique(runs.G)
        a2.boxplot([log_resid[runs.G == g] for g in groups])
        a2.set_xticks(range(1, len(groups) + 1), [f"{g:g}" for g in groups])
        a2.set(xlabel="G (branch rows: family size P + Q + 1)", title="Residuals by G")
        for ax in (a1, a2):
            ax.axhline(0.0, color="k", lw=0.8)
        fig.tight_layout()
        return _save(fig, out, name)


def paper_figures(out: Path, p: LawParams = PAPER, b: BranchParams = PAPER_BRANCH) -> list[Path]:
    """Figs. 1, 2, 5-6 and 7 from the paper's constants, without data."""
    out = Path(out)
    return loss_surfaces(p, out) + isoloss(p, out) + branch_fit(b, out, p=p) + efficiency(p, out)
