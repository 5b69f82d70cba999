"""Tier planner: a training budget and a device -> edge -> cloud tier file in, a familial model plan out.

One exit per tier (G = number of tiers): tier k runs layers [l_{k-1}, l_k) and exit head k; tier 0 also
holds the embedding, every tier holds an unembedding for its exit. The plan:
1. Shapes: Llama-style candidates (d_model 256..12288, depth around a width-dependent aspect ratio,
   GQA 4:1, SwiGLU 8/3 d); N = non-embedding params and FLOPs/token from `trunk.flops` (the full count
   with G exit heads), D = C / flops_per_token, loss from the family law L(N, D, G).
2. Exits: for a shape, every placement l_1 < .. < l_{G-1} < L is scored at once (numpy): tier memory
   (shard weights + KV cache for `context_tokens`) and the per-token latency to each tier's exit (roofline
   decode max(weight bytes / bandwidth, FLOPs / compute) of every tier up to it, plus each hop's round
   trip and hidden-state transfer) against the tier's limits. Among feasible placements the branch law
   (added to the dense law at each exit's size) picks the lowest predicted mean exit loss.
3. The lowest-loss shape with a feasible placement wins (the compute-optimal N when the tiers allow it).
   With none, PlanError names the tier and the limit that fails for the closest candidate.
Outputs a trainer config {model: FamilyConfig fields, train: {tokens, seq_len, batch_size, lr,
warmup_steps}}. Batch size and LR follow DeepSeek LLM's compute fits (B = 0.292 C^0.3271 tokens,
lr = 0.3118 C^-0.125). This file does not train, serve or measure anything.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitting.laws import (PAPER, PAPER_BRANCH, BranchParams, LawParams, branch_loss, dense_loss,
                          efficiency_leverage, efficiency_leverage_compute, family_loss, frontier,
                          frontier_numeric)
from trunk.config import FamilyConfig
from trunk.flops import flops_per_token, param_counts

_TIER_FIELDS = {  # name: (required, help)
    "name": (True, "tier name"),
    "memory_gb": (True, "memory for this tier's weights and KV cache (GB)"),
    "compute_tflops": (True, "sustained compute (TFLOP/s)"),
    "bandwidth_gbs": (True, "memory bandwidth (GB/s)"),
    "latency_ms": (True, "per-token latency target for an answer from this tier's exit (ms)"),
    "rtt_ms": (False, "round trip to the previous tier (ms); required for every tier but the first"),
    "link_gbps": (False, "bandwidth of the link from the previous tier (Gbit/s); required after the first"),
    "context_tokens": (False, "tokens of KV cache to hold (default: the training seq_len)"),
    "prompt_tokens": (False, "prompt length for the prefill estimate (default 512)"),
}
_MAX_PLACEMENTS = 2_000_000


class PlanError(ValueError):
    """No plan: the message (one line) names the tier and the limit that fails."""


@dataclass
class Tier:
    name: str
    memory_gb: float
    compute_tflops: float
    bandwidth_gbs: float
    latency_ms: float
    rtt_ms: float = 0.0
    link_gbps: float = math.inf
    context_tokens: int = 0
    prompt_tokens: int = 512


@dataclass
class PlanConfig:
    seq_len: int = 2048              # training sequence length (and default KV context)
    vocab_size: int = 32000
    bytes_per_param: float = 2.0     # serving weights (bf16)
    act_bytes: float = 2.0           # hidden state element sent between tiers (bf16)
    kv_bytes: float = 2.0            # KV cache element
    max_G: int = 6


# ---- inputs --------------------------------------------------------------------------------------
def _read_mapping(path: str | Path, what: str):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlanError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        import yaml
        return yaml.safe_load(text)       # YAML is a superset of JSON
    except Exception as e:                # yaml raises several types; all mean "unparseable"
        raise PlanError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None


def parse_tiers(doc) -> list[Tier]:
    """Tiers from {tiers: [ {name, ...}, ... ]} or {tiers: {name: {...}, ...}}, in chain order."""
    raw = doc.get("tiers") if isinstance(doc, dict) else None
    if isinstance(raw, dict):
        raw = [{"name": k, **(v or {})} for k, v in raw.items()]
    if not isinstance(raw, list) or not raw:
        raise PlanError("tier file needs a non-empty 'tiers' list (device -> edge -> cloud order)")
    tiers = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise PlanError(f"tier {i + 1} must be a mapping of fields")
        name = t.get("name", f"#{i + 1}")
        unknown = sorted(set(t) - set(_TIER_FIELDS))
        if unknown:
            raise PlanError(f"tier {name!r}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_TIER_FIELDS)}")
        need = [k for k, (req, _) in _TIER_FIELDS.items() if req] + (["rtt_ms", "link_gbps"] if i else [])
        missing = [k for k in need if k not in t]
        if missing:
            raise PlanError(f"tier {name!r}: missing {', '.join(missing)}")
        for k, v in t.items():
            if k != "name" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                                or (v == 0 and k not in ("rtt_ms", "context_tokens", "prompt_tokens"))):
                raise PlanError(f"tier {name!r}: {k} must be a positive number, got {v!r}")
        tiers.append(Tier(**t))
    if len({t.name for t in tiers}) != len(tiers):
        raise PlanError("tier names must be distinct")
    return tiers


def load_tiers(path: str | Path) -> list[Tier]:
    return parse_tiers(_read_mapping(path, "tier file"))


def load_law(path: str | Path) -> LawParams:
    """A `familial-fit --json` result for the family law."""
    doc = _read_mapping(path, "law file")
    try:
        if doc.get("law") != "family":
            raise PlanError(f"{path}: planning needs a family-law fit, this one is {doc.get('law')!r}")
        return LawParams(**{k: float(doc["params"][k]) for k in ("E", "A", "alpha", "B", "beta", "gamma")},
                         source=str(path))
    except (KeyError, TypeError, AttributeError):
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
    around aspect d/L = 48 + 16 log2(d / 256), +-25 % in five steps."""
    out = []
    for d in list(range(256, 1024, 256)) + list(range(1024, 12289, 512)):
        base = d / (48 + 16 * math.log2(d / 256))
        for L in sorted({max(G + 1, round(base * f)) for f in (0.75, 0.875, 1.0, 1.125, 1.25)}):
            out.append(shape(d, L, tuple(range(1, G)), pc))   # placeholder exits: FLOPs do not depend on them
    return out


def flops_per_token_curve(G: int, pc: PlanConfig):
    """FLOPs per token as a smooth function of N: trunk.flops over the rule-aspect shapes, interpolated
    log-log between widths. Feeds `laws.frontier_numeric` for the full-FLOP frontier."""
    rows = []
    for d in list(range(256, 1024, 256)) + list(range(1024, 12289, 512)):
        L = max(G + 1, round(d / (48 + 16 * math.log2(d / 256))))
        cfg = shape(d, L, tuple(range(1, G)), pc)
        rows.append((param_counts(cfg).non_embedding, flops_per_token(cfg, pc.seq_len)))
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
    return frontier_numeric(C, p, flops_per_token_curve(G, pc or PlanConfig()), G)


# ---- exit placement ------------------------------------------------------------------------------
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


def tier_costs(cfg: FamilyConfig, cuts: np.ndarray, tiers: list[Tier], pc: PlanConfig) -> dict:
    """Per placement (K) and tier (G): memory need, decode/transfer/prefill times, latency to each exit."""
    G = len(tiers)
    d, V = cfg.d_model, cfg.vocab_size
    layer_params = param_counts(cfg.replace(n_layers=1, exit_layers=())).non_embedding - d  # one block
    n = np.diff(cuts, axis=1).astype(np.float64)                      # (K, G) layers per tier
    head = np.full(G, float(V * d + d))                               # unembedding + norm per exit
    head[0] += V * d                                                  # tier 0 also embeds
    params = n * layer_params + head                                  # (K, G)
    wbytes = params * pc.bytes_per_param
    ctx = np.array([t.context_tokens or pc.seq_len for t in tiers], dtype=np.float64)
    kv = n * 2 * cfg.n_kv_heads * cfg.head_dim * ctx * pc.kv_bytes
    flops = 2 * params + 4 * n * d * ctx                              # forward FLOPs per decoded token
    comp = np.array([t.compute_tflops * 1e12 for t in tiers])
    bw = np.array([t.bandwidth_gbs * 1e9 for t in tiers])
    decode = np.maximum(wbytes / bw, flops / comp) * 1e3              # ms, roofline
    hop = np.array([0.0] + [t.rtt_ms + d * pc.act_bytes * 8 / (t.link_gbps * 1e9) * 1e3 for t in tiers[1:]])
    latency = np.cumsum(decode + hop, axis=1)                         # (K, G) ms to each exit
    prompt = np.array([t.prompt_tokens for t in tiers], dtype=np.float64)
    return {"layers": n, "params": params, "memory_gb": (wbytes + kv) / 1e9, "decode_ms": decode,
            "hop_ms": np.broadcast_to(hop, n.shape), "latency_ms": latency,
            "prefill_ms": prompt * flops / comp * 1e3}


def _limits(tiers: list[Tier]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([t.memory_gb for t in tiers]), np.array([t.latency_ms for t in tiers]))


def exit_losses(cfg: FamilyConfig, D: float, p: LawParams, b: BranchParams, cuts: np.ndarray) -> np.ndarray:
    """Branch-law loss of every exit for each placement (K, G).

    Exit g (0-based) of G: L_g = L_dense(N l_g / L, D) + (alpha_P g + beta_Q (G - 1 - g)) (D_d / D)^a, the
    branch law added to the dense law at the exit's size. Only L_dense depends on the placement.
    """
    N = param_counts(cfg).non_embedding
    q = cuts[:, 1:] / cfg.n_layers                                     # (K, G) exit depth fractions
    G = q.shape[1]
    P = np.arange(G)[None, :]                                          # exits before exit g
    return branch_loss(P, G - 1 - P, D, dense_loss(N * q, D, p), b)


def place_exits(cfg, D, tiers, pc, p, b):
    """(best cut row, costs at it, exit losses) or (None, diagnosis) when no placement fits."""
    cuts = _placements(cfg.n_layers, len(tiers))
    c = tier_costs(cfg, cuts, tiers, pc)
    mem_lim, lat_lim = _limits(tiers)
    ok = np.all((c["memory_gb"] <= mem_lim) & (c["latency_ms"] <= lat_lim), axis=1)
    if not ok.any():
        # closest placement: the one whose worst relative overshoot is smallest
        over = np.maximum(c["memory_gb"] / mem_lim, c["latency_ms"] / lat_lim).max(1)
        return None, _diagnose(cfg, c, int(np.argmin(over)), tiers, cuts)
    losses = exit_losses(cfg, D, p, b, cuts)
    score = np.where(ok, losses.mean(1), np.inf)
    k = int(np.argmin(score))
    return cuts[k], {key: v[k] for key, v in c.items()}, losses[k]


def _diagnose(cfg, c, k, tiers, cuts) -> str:
    mem_lim, lat_lim = _limits(tiers)
    worst, msg = 0.0, ""
    for g, t in enumerate(tiers):
        m, lat = c["memory_gb"][k, g], c["latency_ms"][k, g]
        if m / mem_lim[g] > worst and m > mem_lim[g]:
            worst = m / mem_lim[g]
            msg = (f"tier {t.name!r} memory: its shard needs {m:.2f} GB (weights + KV cache for "
                   f"{int(c['layers'][k, g])} layers) > memory_gb {t.memory_gb:g}")
        if lat / lat_lim[g] > worst and lat > lat_lim[g]:
            worst = lat / lat_lim[g]
            msg = (f"tier {t.name!r} latency: {lat:.2f} ms per token to its exit (decode "
                   f"{c['decode_ms'][k, :g + 1].sum():.2f} ms + hops {c['hop_ms'][k, :g + 1].sum():.2f} ms) "
                   f"> latency_ms {t.latency_ms:g}")
    return msg


# ---- the plan ------------------------------------------------------------------------------------
def _train_section(C: float, D: float, pc: PlanConfig) -> dict:
    batch_tokens = 0.292 * C ** 0.3271                                 # DeepSeek LLM (2024) fits
    batch = max(1, int(round(batch_tokens / pc.seq_len)))
    steps = max(1, math.ceil(D / (batch * pc.seq_len)))
    return {"tokens": int(D), "seq_len": pc.seq_len, "batch_size": batch,
            "lr": float(0.3118 * C ** -0.125), "warmup_steps": int(min(2000, max(10, steps // 100)))}


def plan(C: float, tiers: list[Tier], pc: PlanConfig | None = None, p: LawParams | None = None,
         b: BranchParams = PAPER_BRANCH) -> dict:
    """The plan for budget C (FLOPs) on `tiers`; see the module docstring. Raises PlanError."""
    pc = pc or PlanConfig()
    p = p or PAPER
    G = len(tiers)
    if not 1 <= G <= pc.max_G:
        raise PlanError(f"{G} tiers: the planner places one exit per tier and supports 1..{pc.max_G}")
    scored = []
    for cfg in candidate_shapes(G, pc):
        N = param_counts(cfg).non_embedding
        fpt = flops_per_token(cfg, pc.seq_len)
        D = C / fpt
        scored.append((float(family_loss(N, D, G, p)), cfg, N, D, fpt))
    scored.sort(key=lambda s: s[0])
    closest = None
    for loss, cfg, N, D, fpt in scored:
        if D < 1:
            continue
        placed = place_exits(cfg, D, tiers, pc, p, b)
        if placed[0] is None:
            closest = closest or (N, placed[1])
            continue
        out = _assemble(C, tiers, pc, p, b, cfg, N, D, fpt, loss, *placed)
        n_opt = out["frontier_6ND"]["N_opt"]
        if closest is not None and N < 0.5 * n_opt:
            out["notes"].append(f"N is {N / n_opt:.3g} x the compute-optimal {n_opt:.3g}: larger models fail "
                                f"(at N={closest[0]:.3g}: {closest[1]})")
        return out
    smallest = min(scored, key=lambda s: s[2])
    diag = place_exits(smallest[1], smallest[3], tiers, pc, p, b)[1]
    raise PlanError(f"infeasible: no model fits these tiers; even the smallest candidate (N={smallest[2]:.3g}) "
                    f"fails {diag}")


def _assemble(C, tiers, pc, p, b, cfg, N, D, fpt, loss, cuts, costs, losses) -> dict:
    cfg = cfg.replace(exit_layers=tuple(int(x) for x in cuts[1:-1]))
    q = cuts[1:] / cfg.n_layers
    n_opt, d_opt = frontier(C, p)
    n_full, d_full = full_flops_frontier(C, len(tiers), p, pc)
    scale = loss / float(np.mean(losses))                             # branch-law shape, family-law level
    tier_rows = []
    for g, t in enumerate(tiers):
        tier_rows.append({
            "name": t.name, "layers": [int(cuts[g]), int(cuts[g + 1])], "exit": g + 1,
            "params": int(costs["params"][g]), "memory_gb": float(costs["memory_gb"][g]),
            "memory_limit_gb": t.memory_gb, "decode_ms": float(costs["decode_ms"][g]),
            "hop_ms": float(costs["hop_ms"][g]), "latency_ms": float(costs["latency_ms"][g]),
            "latency_target_ms": t.latency_ms, "prefill_ms": float(costs["prefill_ms"][g]),
            "predicted_loss": float(losses[g] * scale), "predicted_loss_branch_law": float(losses[g])})
    return {
        "flops": C, "G": len(tiers), "N": int(N), "N_total": int(param_counts(cfg).total), "D": float(D),
        "flops_per_token": fpt, "law": {**p.as_dict(), "source": p.source},
        "frontier_6ND": {"N_opt": float(n_opt), "D_opt": float(d_opt)},
        "frontier_full_flops": {"N_opt": float(n_full), "D_opt": float(d_full)},
        "predicted": {"family_loss": loss, "exit_losses": [r["predicted_loss"] for r in tier_rows],
                      "EL_loss_form": float(efficiency_leverage(C, len(tiers), p, exit_fractions=q)),
                      "EL_compute_form": float(efficiency_leverage_compute(C, len(tiers), p, exit_fractions=q))},
        "tiers": tier_rows,
        "notes": [],
        "trainer_config": {"model": cfg.to_dict(), "train": _train_section(C, D, pc)},
    }


def describe(pl: dict) -> str:
    m = pl["trainer_config"]["model"]
    lines = [f"budget {pl['flops']:.3g} FLOPs -> N = {pl['N']:.4g} non-embedding params "
             f"(d_model {m['d_model']}, {m['n_layers']} layers), D = {pl['D']:.4g} tokens, G = {pl['G']}; "
             f"N_opt = {pl['frontier_full_flops']['N_opt']:.4g} (full FLOP count), "
             f"{pl['frontier_6ND']['N_opt']:.4g} (C = 6ND)",
             f"predicted mean exit loss {pl['predicted']['family_loss']:.4f}; EL {pl['predicted']['EL_loss_form']:.4f} "
             f"(loss form), {pl['predicted']['EL_compute_form']:.3f} (compute form)"]
    for t in pl["tiers"]:
        lines.append(f"  {t['name']:>8s}: layers [{t['layers'][0]}, {t['layers'][1]}) exit {t['exit']}, "
                     f"{t['memory_gb']:.2f}/{t['memory_limit_gb']:g} GB, {t['latency_ms']:.2f}/"
                     f"{t['latency_target_ms']:g} ms per token, prefill {t['prefill_ms']:.1f} ms, "
                     f"loss {t['predicted_loss']:.4f}")
    lines += [f"note: {n}" for n in pl["notes"]]
    return "\n".join(lines)


def write_outputs(pl: dict, out: Path) -> None:
    """The trainer config (JSON, which YAML readers accept too) to `out`, the full plan next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(pl["trainer_config"], indent=2) + "\n")
    out.with_name(out.stem + ".plan.json").write_text(json.dumps(pl, indent=2) + "\n")
