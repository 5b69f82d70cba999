"""Tier planner: a training budget and a device -> edge -> cloud tier file in, a familial model plan out.

One exit per tier (G = number of tiers); the tier cost model (memory, roofline decode, hops) is tiers.py.
1. The trunk is compute-optimal: every candidate Llama-style shape (d_model 256..12288, depth 0.6-1.5x a
   width-dependent aspect) is costed with `trunk.flops` (full count, G exit heads), D = C / flops_per_token,
   and scored by its deepest exit's loss. Shapes within `opt_tol` (0.5 %) of the best are all
   compute-optimal for the budget; among them the one whose exits serve the tiers best wins.
2. Exits: every placement 0 < l_1 < .. < l_{G-1} < L is costed at once (numpy). A placement is valid when
   every tier fits its memory and latency and each tier's exit beats the one below by at least
   `min_gain` (2 %) of its loss, so no tier serves a near-copy of the previous one. Among valid ones the
   deepest exits win, top tier first: each tier gets the best model its limits allow.
3. One law for every number: exit g's loss is the dense law at the exit's size plus the branch-law
   penalty, L_g = L_dense(N_g, D) + (alpha_P g + beta_Q (G-1-g)) (D_d / D)^a; the family's loss is their
   mean and EL compares that mean with the dense side (`dense_side`, as in leverage.py). The family law
   L(N, D, G) (eq. (1)) is reported next to it as a cross-check, never mixed in.
Outputs a trainer config {model: FamilyConfig fields, train: {tokens, seq_len, batch_size, lr,
warmup_steps}}. Batch size and LR follow DeepSeek LLM's compute fits (B = 0.292 C^0.3271 tokens,
lr = 0.3118 C^-0.125). Exits are printed 0-based, as serving numbers them. This file does not train,
serve or measure anything.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

from fitting.laws import (PAPER, PAPER_BRANCH, BranchParams, LawParams, branch_loss, dense_loss, family_law_loss,
                          frontier, frontier_numeric)
from fitting.leverage import DENSE_SIDES, budget_split_loss
from fitting.tiers import (CostConfig, PlanError, Tier, diagnose, feasible, limits, load_tiers,  # noqa: F401
                           parse_tiers, read_mapping, tier_costs)
from trunk.config import FamilyConfig
from trunk.flops import flops_per_token, param_counts

_MAX_PLACEMENTS = 2_000_000
_DEPTH_FACTORS = (0.6, 0.75, 0.875, 1.0, 1.125, 1.25, 1.5)


@dataclass
class PlanConfig(CostConfig):
    vocab_size: int = 32000
    max_G: int = 6
    min_gain: float = 0.02           # each tier's exit beats the exit below by >= this fraction of its loss
    opt_tol: float = 0.005           # shapes whose deepest-exit loss is within this of the best: compute-optimal
    dense_side: str = "matched"      # dense side of the predicted EL (leverage.DENSE_SIDES)


@dataclass(frozen=True)
class PlanInputs:
    """One planning problem: what every step of the plan reads."""
    C: float                                             # training budget, FLOPs
    tiers: list[Tier]                                    # shallow to deep; one exit each, so G = len(tiers)
    pc: PlanConfig = field(default_factory=PlanConfig)
    p: LawParams = PAPER                                 # the dense law (a family-law fit, or the paper's)
    b: BranchParams = PAPER_BRANCH                       # the branch-law penalty per exit

    @property
    def G(self) -> int:
        return len(self.tiers)


def load_law(path: str | Path) -> LawParams:
    """A `familial-fit --json` result for the family law (with its gamma_on and n_kind when recorded)."""
    doc = read_mapping(path, "law file")
    if isinstance(doc, dict) and doc.get("law") != "family":
        raise PlanError(f"{path}: planning needs a family-law fit, this one is {doc.get('law')!r}")
    try:
        return LawParams(**{k: float(doc["params"][k]) for k in ("E", "A", "alpha", "B", "beta", "gamma")},
                         source=str(path), gamma_on=doc.get("gamma_on", "equation"),
                         n_kind=doc.get("n_kind", "non-embedding"))
    except (KeyError, TypeError, AttributeError, ValueError):
        raise PlanError(f"{path}: not a familial-fit --json result (needs params E, A, alpha, B, beta, gamma)") from None


# ---- shapes --------------------------------------------------------------------------------------
def shape(d_model: int, n_layers: int, exit_layers: tuple[int, ...], pc: PlanConfig) -> FamilyConfig:
    """A Llama-style family shape: head dim 64 (d < 1024) or 128, GQA 4:1, SwiGLU width 8/3 d."""
    head_dim = 64 if d_model < 1024 else 128
    n_heads = d_model // head_dim
    n_kv = n_heads // 4 if n_heads % 4 == 0 else n_heads
    d_ff = int(math.ceil(8 * d_model / 3 / 64) * 64)
    return FamilyConfig(vocab_size=pc.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                        n_kv_heads=n_kv, d_ff=d_ff, max_seq_len=pc.seq_len, exit_layers=tuple(exit_layers))


def candidate_shapes(G: int, pc: PlanConfig) -> list[FamilyConfig]:
    """Widths 256..12288 (step 256 below 1024, 512 above, so heads come in multiples of 4); depths
    around aspect d/L = 48 + 16 log2(d / 256), from 0.6x to 1.5x (deeper-narrower shapes give shallow
    tiers more layers at the same N)."""
    out = []
    for d in list(range(256, 1024, 256)) + list(range(1024, 12289, 512)):
        base = d / (48 + 16 * math.log2(d / 256))
        for L in sorted({max(G + 1, round(base * f)) for f in _DEPTH_FACTORS}):
            out.append(shape(d, L, tuple(range(1, G)), pc))   # placeholder exits: FLOPs do not depend on them
    return out


def law_n(cfg: FamilyConfig, p: LawParams) -> int:
    """N as the law counts it: non-embedding parameters, or every parameter (p.n_kind == "total")."""
    pc = param_counts(cfg)
    return pc.total if p.n_kind == "total" else pc.non_embedding


def flops_per_token_curve(G: int, pc: PlanConfig, p: LawParams = PAPER):
    """FLOPs per token as a smooth function of the law's N: trunk.flops over the rule-aspect shapes,
    interpolated log-log between widths. Feeds `laws.frontier_numeric` for the full-FLOP frontier."""
    rows = []
    for d in list(range(256, 1024, 256)) + list(range(1024, 12289, 512)):
        L = max(G + 1, round(d / (48 + 16 * math.log2(d / 256))))
        cfg = shape(d, L, tuple(range(1, G)), pc)
        rows.append((law_n(cfg, p), flops_per_token(cfg, pc.seq_len)))
    lnN, lnF = (np.log(np.array(v, dtype=np.float64)) for v in zip(*rows))
    slope_lo = (lnF[1] - lnF[0]) / (lnN[1] - lnN[0])
    slope_hi = (lnF[-1] - lnF[-2]) / (lnN[-1] - lnN[-2])

    def f(N: float) -> float:
        x = math.log(N)
        if x < lnN[0]:
            return math.exp(lnF[0] + slope_lo * (x - lnN[0]))
        if x > lnN[-1]:
            return math.exp(lnF[-1] + slope_hi * (x - lnN[-1]))
        return math.exp(float(np.interp(x, lnN, lnF)))
    return f


def full_flops_frontier(C, G: int, p: LawParams = PAPER, pc: PlanConfig | None = None):
    """(N_opt, D_opt) under the full FLOP count (attention, G exit heads) rather than C = 6ND."""
    return frontier_numeric(C, p, flops_per_token_curve(G, pc or PlanConfig(), p), G)


# ---- exits -----------------------------------------------------------------------------------------
def _placements(L: int, G: int) -> np.ndarray:
    """All cut points 0 = c_0 < c_1 < .. < c_{G-1} < c_G = L: (K, G + 1)."""
    if G == 1:
        return np.array([[0, L]])
    step = 1
    while math.comb((L - 1) // step, G - 1) > _MAX_PLACEMENTS:
        step += 1
    cuts = np.array(list(itertools.combinations(range(step, L, step), G - 1)), dtype=np.int64)
    K = len(cuts)
    return np.concatenate([np.zeros((K, 1), np.int64), cuts, np.full((K, 1), L, np.int64)], 1)


def exit_sizes(cfg: FamilyConfig, cuts: np.ndarray, p: LawParams) -> np.ndarray:
    """(K, G) each exit's N as the law counts it: its share l_g / L of the non-embedding parameters
    (plus the embedding when the law counts total parameters)."""
    pc = param_counts(cfg)
    N = pc.non_embedding * cuts[:, 1:] / cfg.n_layers
    return N + (pc.embedding if p.n_kind == "total" else 0)


def exit_losses(cfg: FamilyConfig, D: float, p: LawParams, b: BranchParams, cuts: np.ndarray) -> np.ndarray:
    """(K, G) loss of every exit: the dense law at the exit's size plus the branch-law penalty,
    L_g = L_dense(N_g, D) + (alpha_P g + beta_Q (G - 1 - g)) (D_d / D)^a."""
    G = cuts.shape[1] - 1
    P = np.arange(G)[None, :]                                          # exits before exit g
    return branch_loss(P, G - 1 - P, D, dense_loss(exit_sizes(cfg, cuts, p), D, p), b)


@dataclass
class Placement:
    """Where a shape's exits go (see the module docstring), or why none fits (`error`, other fields None)."""
    cuts: np.ndarray | None = None         # (G+1,) 0, l_1, .., l_{G-1}, L
    costs: dict | None = None              # tiers.tier_costs' arrays at this placement, each (G,)
    losses: np.ndarray | None = None       # (G,) predicted loss of each exit
    gains: np.ndarray | None = None        # (G-1,) relative gain of each exit over the one below
    min_gain_met: bool = False
    error: str | None = None               # the diagnosis when no placement fits the tiers at all


def place_exits(cfg: FamilyConfig, D: float, inp: PlanInputs) -> Placement:
    """The best valid placement of `cfg`'s exits when trained on D tokens (see the module docstring)."""
    tiers, pc, p, b = inp.tiers, inp.pc, inp.p, inp.b
    cuts = _placements(cfg.n_layers, len(tiers))
    c = tier_costs(cfg, cuts, tiers, pc)
    ok = feasible(c, tiers)
    if not ok.any():
        mem_lim, lat_lim = limits(tiers)
        over = np.maximum(c["memory_gb"] / mem_lim, c["latency_ms"] / lat_lim).max(1)
        return Placement(error=diagnose(c, int(np.argmin(over)), tiers))
    losses = exit_losses(cfg, D, p, b, cuts)
    gains = 1.0 - losses[:, 1:] / losses[:, :-1]                       # (K, G-1) relative gain per tier
    good = ok & np.all(gains >= pc.min_gain, axis=1)
    idx = np.flatnonzero(good if good.any() else ok)
    G = len(tiers)
    # deepest exits first, top tier first (np.lexsort's primary key is the last one)
    order = np.lexsort([-cuts[idx, g] for g in range(1, G)]) if G > 1 else np.arange(len(idx))
    if not good.any():                                                 # no valid one: the largest smallest gain
        order = np.argsort(-gains[idx].min(1), kind="stable")
    k = int(idx[order[0]])
    return Placement(cuts[k], {key: v[k] for key, v in c.items()}, losses[k], gains[k], bool(good.any()))


# ---- the plan ------------------------------------------------------------------------------------
def _train_section(C: float, D: float, pc: PlanConfig) -> dict:
    batch_tokens = 0.292 * C ** 0.3271                                 # DeepSeek LLM (2024) fits
    batch = max(1, int(round(batch_tokens / pc.seq_len)))
    steps = max(1, math.ceil(D / (batch * pc.seq_len)))
    return {"tokens": int(D), "seq_len": pc.seq_len, "batch_size": batch,
            "lr": float(0.3118 * C ** -0.125), "warmup_steps": int(min(2000, max(10, steps // 100)))}


@dataclass
class ScoredShape:
    """A candidate trunk, costed for the budget (placement-independent)."""
    cfg: FamilyConfig
    N: int                 # as the law counts it
    D: float
    fpt: float
    top_loss: float        # the deepest exit's loss (placement-independent)


def scored_shapes(inp: PlanInputs) -> list[ScoredShape]:
    """Every candidate shape for G = len(inp.tiers) exits that sees at least one token, best deepest exit first."""
    C, G, pc, p, b = inp.C, inp.G, inp.pc, inp.p, inp.b
    out = []
    for cfg in candidate_shapes(G, pc):
        fpt = flops_per_token(cfg, pc.seq_len)
        D = C / fpt
        if D < 1:
            continue
        N = law_n(cfg, p)
        top = float(branch_loss(G - 1, 0, D, dense_loss(N, D, p), b))
        out.append(ScoredShape(cfg, N, D, fpt, top))
    return sorted(out, key=lambda s: s.top_loss)


def _choose(shapes: list[ScoredShape], inp: PlanInputs) -> tuple[ScoredShape, Placement, list[str]]:
    """(shape, placement, notes): the compute-optimal shape whose exits serve the tiers best."""
    tiers, pc = inp.tiers, inp.pc
    best_top = shapes[0].top_loss
    near, rest = ([s for s in shapes if s.top_loss <= best_top * (1 + pc.opt_tol)],
                  [s for s in shapes if s.top_loss > best_top * (1 + pc.opt_tol)])
    placed = [(s, place_exits(s.cfg, s.D, inp)) for s in near]
    placed = [(s, pl) for s, pl in placed if pl.error is None]
    notes = []
    if not placed:                                                     # smaller than optimal: first that fits
        for s in rest:
            pl = place_exits(s.cfg, s.D, inp)
            if pl.error is None:
                first_err = place_exits(near[0].cfg, near[0].D, inp).error
                notes.append(f"the compute-optimal trunk does not fit ({first_err}); this one is "
                             f"{s.top_loss / best_top - 1:.2%} worse at its deepest exit")
                placed = [(s, pl)]
                break
    if not placed:
        smallest = min(shapes, key=lambda s: s.N)
        raise PlanError(f"infeasible: no model fits these tiers; even the smallest candidate (N={smallest.N:.3g}) "
                        f"fails {place_exits(smallest.cfg, smallest.D, inp).error}")
    met = [(s, pl) for s, pl in placed if pl.min_gain_met]
    s, pl = min(met or placed, key=lambda t: float(np.mean(t[1].losses)))
    if not pl.min_gain_met:
        g = int(np.argmin(pl.gains))
        notes.append(f"tier {tiers[g + 1].name!r} adds only {pl.gains[g]:.2%} over the exit below it "
                     f"(min_gain {pc.min_gain:.0%}): at this budget the tiers below already serve nearly the same "
                     f"model; consider fewer tiers or a larger budget")
    return s, pl, notes


def plan(C: float, tiers: list[Tier], pc: PlanConfig | None = None, p: LawParams | None = None,
         b: BranchParams = PAPER_BRANCH) -> dict:
    """The plan for budget C (FLOPs) on `tiers`; see the module docstring. Raises PlanError."""
    inp = PlanInputs(C, tiers, pc or PlanConfig(), p or PAPER, b)
    pc, G = inp.pc, inp.G
    if not 1 <= G <= pc.max_G:
        raise PlanError(f"{G} tiers: the planner places one exit per tier and supports 1..{pc.max_G}")
    if pc.dense_side not in DENSE_SIDES:
        raise PlanError(f"dense_side must be one of {', '.join(DENSE_SIDES)}, got {pc.dense_side!r}")
    shapes = scored_shapes(inp)
    if not shapes:
        raise PlanError(f"budget {C:g} FLOPs is below one token of the smallest candidate model")
    s, pl, notes = _choose(shapes, inp)
    return _assemble(inp, s, pl, notes)


def _dense_models(inp: PlanInputs, cfg: FamilyConfig, cuts: np.ndarray, D: float):
    """(N_g, D_g) of the EL dense side: dense models of the exits' widths and depths, trained with the
    family's whole budget C ("matched", via trunk.flops) or on its D tokens ("same-tokens")."""
    C, p, pc = inp.C, inp.p, inp.pc
    Ns, Ds = [], []
    for l in cuts[1:]:
        dense = cfg.replace(n_layers=int(l), exit_layers=())
        Ns.append(law_n(dense, p))
        Ds.append(C / flops_per_token(dense, pc.seq_len) if pc.dense_side == "matched" else D)
    return np.array(Ns, dtype=np.float64), np.array(Ds)


def predicted_el(inp: PlanInputs, cfg: FamilyConfig, cuts: np.ndarray, D: float, family_loss_mean: float) -> dict:
    """EL of the planned family from the same laws as its exit losses: loss form and compute form (the
    factor on the dense side's tokens at which its mean loss reaches the family's)."""
    C, p, pc = inp.C, inp.p, inp.pc
    G = len(cuts) - 1
    if pc.dense_side == "budget-split":
        q = cuts[1:] / cfg.n_layers
        dense = lambda s: float(budget_split_loss(C, G, p, exit_fractions=q, scale=s))
    else:
        Ns, Ds = _dense_models(inp, cfg, cuts, D)
        dense = lambda s: float(np.mean(dense_loss(Ns, Ds * s, p)))
    el = dense(1.0) / family_loss_mean
    h = lambda ls: math.log(dense(math.exp(ls)) / family_loss_mean)
    try:
        elc = math.exp(brentq(h, -30.0, 30.0, xtol=1e-12)) if family_loss_mean > p.E else math.inf
    except ValueError:                                                 # no sign change: out of reach
        elc = math.inf
    return {"dense_side": pc.dense_side, "EL_loss_form": el, "EL_compute_form": elc}


def _tier_rows(tiers: list[Tier], pl: Placement) -> list[dict]:
    cuts, costs, losses, gains = pl.cuts, pl.costs, pl.losses, pl.gains
    rows = []
    for g, t in enumerate(tiers):
        rows.append({
            "name": t.name, "layers": [int(cuts[g]), int(cuts[g + 1])], "exit": g,
            "params": int(costs["params"][g]), "memory_gb": float(costs["memory_gb"][g]),
            "memory_limit_gb": t.memory_gb, "decode_ms": float(costs["decode_ms"][g]),
            "hop_ms": float(costs["hop_ms"][g]), "latency_ms": float(costs["latency_ms"][g]),
            "latency_target_ms": t.latency_ms, "prefill_ms": float(costs["prefill_ms"][g]),
            "predicted_loss": float(losses[g]), "gain_over_previous": float(gains[g - 1]) if g else None})
    return rows


def _assemble(inp: PlanInputs, s: ScoredShape, pl: Placement, notes: list[str]) -> dict:
    """The plan document (see `describe` and `write_outputs`) for shape `s` with exits placed at `pl`."""
    C, tiers, p, b = inp.C, inp.tiers, inp.p, inp.b
    cuts = pl.cuts
    cfg = s.cfg.replace(exit_layers=tuple(int(x) for x in cuts[1:-1]))
    n_opt, d_opt = frontier(C, p)
    n_full, d_full = full_flops_frontier(C, len(tiers), p, inp.pc)
    fam = float(np.mean(pl.losses))
    return {
        "flops": C, "G": len(tiers), "N": int(s.N), "n_kind": p.n_kind,
        "N_non_embedding": int(param_counts(cfg).non_embedding), "N_total": int(param_counts(cfg).total),
        "D": float(s.D), "flops_per_token": s.fpt,
        "law": {**p.as_dict(), "gamma_on": p.gamma_on, "source": p.source}, "branch_law": {**b.as_dict(), "D_unit": b.D_unit},
        "frontier_6ND": {"N_opt": float(n_opt), "D_opt": float(d_opt)},
        "frontier_full_flops": {"N_opt": float(n_full), "D_opt": float(d_full)},
        "predicted": {"family_loss": fam, "exit_losses": [float(v) for v in pl.losses],
                      **predicted_el(inp, cfg, cuts, s.D, fam),
                      "family_law_loss": float(family_law_loss(s.N, s.D, len(tiers), p))},
        "tiers": _tier_rows(tiers, pl),
        "notes": notes,
        "trainer_config": {"model": cfg.to_dict(), "train": _train_section(C, s.D, inp.pc)},
    }


def describe(pl: dict) -> str:
    m = pl["trainer_config"]["model"]
    pr = pl["predicted"]
    lines = [f"budget {pl['flops']:.3g} FLOPs -> N = {pl['N']:.4g} ({pl['n_kind']}) params "
             f"(d_model {m['d_model']}, {m['n_layers']} layers), D = {pl['D']:.4g} tokens, G = {pl['G']}; "
             f"N_opt = {pl['frontier_full_flops']['N_opt']:.4g} (full FLOP count), "
             f"{pl['frontier_6ND']['N_opt']:.4g} (C = 6ND)",
             f"predicted mean exit loss {pr['family_loss']:.4f} (family law eq. (1): {pr['family_law_loss']:.4f}); "
             f"EL vs {pr['dense_side']} dense models {pr['EL_loss_form']:.4f} (loss form), "
             f"{pr['EL_compute_form']:.3f} (compute form)"]
    for t in pl["tiers"]:
        gain = f", {t['gain_over_previous']:+.1%} better than exit {t['exit'] - 1}" if t["exit"] else ""
        lines.append(f"  {t['name']:>8s}: exit {t['exit']} after layer {t['layers'][1]} (layers [{t['layers'][0]}, "
                     f"{t['layers'][1]})), {t['memory_gb']:.2f}/{t['memory_limit_gb']:g} GB, {t['latency_ms']:.2f}/"
                     f"{t['latency_target_ms']:g} ms per token, prefill {t['prefill_ms']:.1f} ms, "
                     f"loss {t['predicted_loss']:.4f}{gain}")
    lines += [f"note: {n}" for n in pl["notes"]]
    return "\n".join(lines)


def write_outputs(pl: dict, out: Path) -> None:
    """The trainer config (JSON, which YAML readers accept too) to `out`, the full plan next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(pl["trainer_config"], indent=2) + "\n")
    out.with_name(out.stem + ".plan.json").write_text(json.dumps(pl, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(v):
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
