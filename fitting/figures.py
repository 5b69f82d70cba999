"""The paper's figures, drawn with matplotlib (Agg) as PNG + PDF pairs.

  loss_surfaces    Fig. 1: the loss surface L(N, D) as 3-D surfaces, one per G (+ runs as points)
  isoloss          Fig. 2: isoloss contours over (N, D) with IsoFLOP lines and the efficient frontier
  loss_vs_G        Figs. 3-6: loss against G, one panel per budget, one line per model size, runs as markers
  branch_fit       branch law: penalty L - L_dense against D per (P, Q), and what the unit of D does
  efficiency       Fig. 7: EL against FLOPs for G in {3..6}: three dense sides, both G^gamma readings
  identifiability  the objective profiled over (ln A, ln B), its 95 % region, the N_opt exponent across it
  residuals        log residuals by compute budget and by G
`paper_figures(dir)` draws them from the paper's constants (the profile on synthetic paper-design runs).
Every function takes the law's parameters or a computed profile; none fits anything or reads files.
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
                          family_law_loss, frontier)
from fitting.leverage import DENSE_SIDES, efficiency_leverage, efficiency_leverage_compute  # noqa: E402

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


def _surface_range(runs: Runs | None, p: LawParams):
    if runs is None:
        return (np.logspace(8.5, 10.3, 40), np.logspace(8.5, 11.5, 40)) if p.n_kind == "total" else \
               (np.logspace(7, 10, 40), np.logspace(8, 12, 40))
    return (np.geomspace(runs.N.min() / 1.5, runs.N.max() * 1.5, 40),
            np.geomspace(runs.D.min() / 1.5, runs.D.max() * 1.5, 40))


def loss_surfaces(p: LawParams, out: Path, runs: Runs | None = None, Gs=(1, 2, 3, 4)) -> list[Path]:
    """Fig. 1: L(N, D, G) as a surface over (log N, log D), one 3-D panel per G; runs (if any) as points."""
    N, D = _surface_range(runs, p)
    NN, DD = np.meshgrid(N, D, indexing="ij")
    with plt.rc_context(_STYLE):
        fig = plt.figure(figsize=(4.2 * min(len(Gs), 4), 4.0))
        for k, G in enumerate(Gs[:4]):
            ax = fig.add_subplot(1, min(len(Gs), 4), k + 1, projection="3d")
            L = family_law_loss(NN, DD, G, p)
            ax.plot_surface(np.log10(NN), np.log10(DD), L, cmap="viridis", alpha=0.8, lw=0, antialiased=True)
            if runs is not None:
                m = runs.G == G
                ax.scatter(np.log10(runs.N[m]), np.log10(runs.D[m]), runs.loss[m], color="crimson", s=8,
                           depthshade=False)
            ax.set(xlabel="log10 N", ylabel="log10 D", zlabel="loss", title=f"G = {G}")
            ax.view_init(elev=24, azim=-130)
        fig.suptitle(f"Loss surfaces L(N, D, G) ({p.n_kind} N; G^gamma on the {_reading(p)})")
        fig.tight_layout()
        return _save(fig, out, "fig1_loss_surfaces")


def _reading(p: LawParams) -> str:
    return "whole loss, eq. (1)" if p.gamma_on == "equation" else "learnable terms"


def _loss_vs_G_panel(ax, p, C, sizes, runs, Gmax):
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(sizes)))
    g = np.linspace(1, Gmax, 100)
    for N, c in zip(sizes, colors):
        ax.plot(g, family_law_loss(N, C / (6 * N), g, p), color=c, lw=1.3, label=f"N = {N:.2g}")
        if runs is not None:
            m = (np.abs(np.log10(runs.C / C)) < 0.025) & (np.abs(np.log(runs.N / N)) < 0.02)
            ax.scatter(runs.G[m], runs.loss[m], color=c, edgecolor="k", lw=0.4, s=22, zorder=3)
        else:
            G = np.arange(1, Gmax + 1)
            ax.scatter(G, family_law_loss(N, C / (6 * N), G, p), color=c, s=14, zorder=3)
    ax.set(xlabel="granularity G (exits)", ylabel="loss", title=f"C = {C:.0e} FLOPs")
    ax.legend(fontsize=7)


def loss_vs_G(p: LawParams, out: Path, runs: Runs | None = None, budgets=(1e19, 1e20, 1e21),
              sizes=(1e9, 2e9, 3e9, 4e9, 8e9, 12e9)) -> list[Path]:
    """Figs. 3-6: loss against G at each budget, one line per model size (law) with the runs as markers.

    Without runs: the paper's budgets and its sizes 1B-4B plus the fam8B / fam12B sizes of its figures."""
    if runs is not None:
        budgets = _budgets(runs)[-4:]
    Gmax = int(runs.G.max()) if runs is not None else 4
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), squeeze=False)
        for ax, C in zip(axes[0], budgets):
            Ns = sizes if runs is None else np.unique(np.round(runs.N[np.abs(np.log10(runs.C / C)) < 0.025], -3))[:6]
            _loss_vs_G_panel(ax, p, C, Ns, runs, max(Gmax, 2))
        fig.suptitle(f"Loss against granularity (lines: the law; markers: {'runs' if runs is not None else 'integer G'})")
        fig.tight_layout()
        return _save(fig, out, "fig3_6_loss_vs_G")


def isoloss(p: LawParams, out: Path, G: int = 4, runs: Runs | None = None) -> list[Path]:
    """Fig. 2: contours of log L(N, D, G) with IsoFLOP lines (C = 6ND) and the efficient frontier."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(6.2, 4.8))
        N = np.logspace(7, 11, 300)
        D = np.logspace(8, 13, 300)
        NN, DD = np.meshgrid(N, D)
        L = family_law_loss(NN, DD, G, p)
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
               xlabel=f"parameters N ({p.n_kind})", ylabel="training tokens D",
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


def _branch_penalty_panel(ax, b: BranchParams, runs: Runs | None):
    pairs = _branch_pairs(runs)
    D = np.logspace(8, 12, 100) if runs is None else np.geomspace(runs.D.min() / 1.5, runs.D.max() * 1.5, 100)
    cold = plt.cm.viridis(np.linspace(0, 0.85, max(1, sum(P == 0 for P, _ in pairs))))
    warm = plt.cm.autumn(np.linspace(0, 0.6, max(1, sum(P > 0 for P, _ in pairs))))
    hidden, i_cold, i_warm = 0, 0, 0
    for P, Q in pairs:
        c = cold[i_cold] if P == 0 else warm[i_warm]
        i_cold, i_warm = i_cold + (P == 0), i_warm + (P > 0)
        ax.plot(D, branch_loss(P, Q, D, 0.0, b), color=c, lw=1.4, ls="-" if P == 0 else "--", label=f"P={P}, Q={Q}")
        if runs is not None:
            m = (runs.P == P) & (runs.Q == Q)
            pen = runs.loss[m] - runs.L_dense[m]
            hidden += int(np.sum(pen <= 0))
            ax.scatter(runs.D[m][pen > 0], pen[pen > 0], s=12, color=c, edgecolor="k", lw=0.3, zorder=3)
    title = (f"Branch penalty (alpha_P={b.alpha_P:.3g}, beta_Q={b.beta_Q:.3g}, D_d={b.D_d:.3g}, a={b.a:.3g};"
             f"\nD in units of {b.D_unit:g} tokens)")
    ax.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="L - L_dense (nats)",
           title=title + (f"; {hidden} runs with L <= L_dense not shown" if hidden else ""))
    ax.legend(ncol=2, title="solid: exits after (Q); dashed: before (P)", title_fontsize=7)


def _branch_pred_panel(ax, b: BranchParams, runs: Runs):
    pred = branch_loss(runs.P, runs.Q, runs.D, runs.L_dense, b)
    ax.scatter(runs.loss, pred, s=10, c=runs.Q, cmap="viridis", edgecolor="k", lw=0.3)
    lo, hi = min(runs.loss.min(), pred.min()), max(runs.loss.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    rms = lambda v: float(np.sqrt(np.mean((v / runs.loss - 1) ** 2)))
    ax.text(0.03, 0.97, f"rms rel. error: branch law {rms(pred):.3%}\ndense loss alone (L_dense) "
            f"{rms(runs.L_dense):.3%}", transform=ax.transAxes, va="top", fontsize=8, bbox={"fc": "w", "ec": "0.7"})
    ax.set(xlabel="observed exit loss", ylabel="branch-law prediction", title="Predicted vs observed (colour: Q)")


def _branch_unit_panel(ax, b: BranchParams, p: LawParams):
    """Penalty of each exit of a G = 4 family on the paper's design (1-4B, 1e19-1e21) under three units."""
    D = np.geomspace(1e19 / (6 * 4e9), 1e21 / (6 * 1e9), 60)            # the design's token range
    L = family_law_loss(2e9, D, 1.0, p)
    for unit, ls in ((1.0, ":"), (1e3, "-"), (1e6, "--")):
        bu = BranchParams(b.alpha_P, b.beta_Q, b.D_d, b.a, D_unit=unit)
        for g, c in zip(range(3), plt.cm.plasma(np.linspace(0, 0.7, 3))):
            ax.plot(D, 100 * (branch_loss(g, 3 - g, D, L, bu) / L - 1), color=c, ls=ls, lw=1.3,
                    label=f"exit {g}, unit {unit:g}" if g == 0 or unit == 1e3 else None)
    ax.set(xscale="log", yscale="log", ylim=(1e-3, 1e3), xlabel="training tokens D (the paper's design)",
           ylabel="penalty (% of L_dense)", title="G = 4 family: penalty under D in tokens (:), 1e3 (-), 1e6 (--)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.legend(fontsize=7)


def branch_fit(b: BranchParams, out: Path, runs: Runs | None = None, p: LawParams = PAPER) -> list[Path]:
    """The branch law: penalty L - L_dense against D per (P, Q); with runs, predicted against observed exit
    loss; without, the penalty of a G = 4 family over the paper's token range under three units of D."""
    with plt.rc_context(_STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
        _branch_penalty_panel(a1, b, runs)
        if runs is not None:
            _branch_pred_panel(a2, b, runs)
        else:
            _branch_unit_panel(a2, b, p)
        fig.tight_layout()
        return _save(fig, out, "branch_law")


def efficiency(p: LawParams, out: Path, Gs=(3, 4, 5, 6)) -> list[Path]:
    """Fig. 7: EL against FLOPs; columns = the three dense sides, rows = loss and compute form; solid = eq. (1)
    (G^gamma on the whole loss), dashed = the text's reading (on the learnable terms only)."""
    C = np.logspace(17, 28, 45)
    readings = ((p.replace(gamma_on="equation"), "-"), (p.replace(gamma_on="learnable"), "--"))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.6), sharex=True)
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(Gs)))
        for j, side in enumerate(DENSE_SIDES):
            for G, c in zip(Gs, colors):
                for q, ls in readings:
                    lab = f"G={G}" if ls == "-" else None
                    axes[0, j].plot(C, efficiency_leverage(C, G, q, side), color=c, ls=ls, lw=1.4, label=lab)
                    axes[1, j].plot(C, efficiency_leverage_compute(C, G, q, side), color=c, ls=ls, lw=1.4)
            axes[0, j].set_title(f"dense side: {side}")
            axes[1, j].set(yscale="log", xlabel="training FLOPs C")
            axes[1, j].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        for ax in axes.flat:
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axvspan(1e19, 1e21, color="0.9", zorder=0)
            ax.set_xscale("log")
        axes[0, 0].set_ylabel("EL = L_dense / L_family")
        axes[1, 0].set_ylabel("EL_C = dense compute factor")
        axes[0, 0].legend(title="solid: eq. (1); dashed: learnable", title_fontsize=7)
        fig.suptitle("Efficiency Leverage (shaded: the paper's budgets 1e19-1e21)")
        fig.tight_layout()
        return _save(fig, out, "fig7_efficiency_leverage")


def identifiability(prof, out: Path, paper_ab=(6.0, 8.0)) -> list[Path]:
    """(ln A, ln B) profile: the LR statistic with its 95 % region, and the N_opt exponent across it."""
    A, B = np.meshgrid(prof.a, prof.b, indexing="ij")
    with plt.rc_context(_STYLE):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
        lr = np.clip(prof.lr_stat(), 1e-2, 1e6) if prof.scale > 0 else np.clip(prof.f - prof.f_min, 1e-30, None)
        cs = a1.contourf(A, B, np.log10(lr), levels=24, cmap="magma_r")
        fig.colorbar(cs, ax=a1, label="log10 LR statistic" if prof.scale > 0 else "log10 (f - f_min)")
        expo = prof.n_opt_exponent()
        cs2 = a2.contourf(A, B, expo, levels=np.linspace(np.nanmin(expo), np.nanmax(expo), 24), cmap="coolwarm")
        fig.colorbar(cs2, ax=a2, label="N_opt exponent beta / (alpha + beta)")
        for ax in (a1, a2):
            if prof.scale > 0:
                ax.contour(A, B, prof.lr_stat(), levels=[5.991], colors="k", linewidths=1.4)
            ax.plot(*paper_ab, "*", color="gold", mec="k", ms=14, label="paper: ln A = 6, ln B = 8 (grid points)")
            ax.plot(*prof.ab_free, "o", color="w", mec="k", ms=7, label="free fit")
            ax.set(xlabel="a = ln A", ylabel="b = ln B")
        a1.set_title("Objective profiled over (a, b); black: 95 % region (LR < 5.99)")
        a2.set_title("N_opt exponent at each (a, b) (others re-fitted)")
        a1.legend(loc="lower right", fontsize=7, frameon=True)
        fig.tight_layout()
        return _save(fig, out, "identifiability")


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


def paper_figures(out: Path, p: LawParams = PAPER, b: BranchParams = PAPER_BRANCH, profile=None) -> list[Path]:
    """Figs. 1, 2, 3-6, 7, the branch law and the identifiability profile from the paper's constants.

    `profile`: an identifiability.Profile to draw (default: computed on 0.5 %-noise paper-design runs, ~10 s)."""
    out = Path(out)
    if profile is None:
        from fitting.identifiability import paper_design_runs, profile_ab
        profile = profile_ab(paper_design_runs(p, noise=0.005, seed=0), np.arange(0.0, 16.01, 0.5),
                             np.arange(6.0, 10.01, 0.25))
    return (loss_surfaces(p, out) + isoloss(p, out) + loss_vs_G(p, out) + branch_fit(b, out, p=p)
            + efficiency(p, out) + identifiability(profile, out))
