"""Tier files and the tier cost model: what each tier can hold and how long an answer from its exit takes.

A tier file (YAML or JSON) lists tiers in chain order (device -> edge -> cloud); one exit per tier. Tier k
runs layers [c_k, c_{k+1}) and exit head k; tier 0 also holds the embedding, every tier an unembedding.
  memory   = shard weights + KV cache for `context_tokens`
  decode   = roofline max(weight bytes / bandwidth, forward FLOPs / compute) per token
  latency  = to exit k: the decode of every tier up to k, plus each hop's rtt_ms and the hidden state over
             link_gbps
  prefill  = prompt_tokens * FLOPs / compute (reported, not constrained)
This file knows nothing about scaling laws; `planner.py` chooses shapes and exits with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trunk.config import FamilyConfig
from trunk.flops import param_counts

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
class CostConfig:
    seq_len: int = 2048              # default KV context
    bytes_per_param: float = 2.0     # serving weights (bf16)
    act_bytes: float = 2.0           # hidden state element sent between tiers (bf16)
    kv_bytes: float = 2.0            # KV cache element


def read_mapping(path: str | Path, what: str):
    """A YAML (or JSON, its subset) file as Python data; PlanError in one line when unreadable."""
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
    return parse_tiers(read_mapping(path, "tier file"))


def limits(tiers: list[Tier]) -> tuple[np.ndarray, np.ndarray]:
    """(memory_gb (G,), latency_ms (G,)) limits."""
    return (np.array([t.memory_gb for t in tiers]), np.array([t.latency_ms for t in tiers]))


def tier_costs(cfg: FamilyConfig, cuts: np.ndarray, tiers: list[Tier], pc: CostConfig) -> dict:
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


def feasible(c: dict, tiers: list[Tier]) -> np.ndarray:
    """(K,) bool: every tier within its memory and latency limit."""
    mem_lim, lat_lim = limits(tiers)
    return np.all((c["memory_gb"] <= mem_lim) & (c["latency_ms"] <= lat_lim), axis=1)


def diagnose(c: dict, k: int, tiers: list[Tier]) -> str:
    """One line naming the tier and limit that fails worst at placement k."""
    mem_lim, lat_lim = limits(tiers)
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
