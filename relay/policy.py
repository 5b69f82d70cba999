"""Exit decisions and token sampling from one exit's logits: confidence stats, thresholds, sampling.

Confidence of a distribution p over the vocabulary (computed in float64 on the last position):
    max_prob = max_i p_i,   entropy = -sum_i p_i log p_i (nats),   margin = p_(1) - p_(2).
A confidence policy exits at the first exit (shallow to deep, up to the deepest wanted) whose
statistic passes: max_prob >= thr, entropy <= thr, margin >= thr. FIXED answers from the exit asked.

Sampling: temperature 0 is greedy (`argmax`, lowest index on ties, as the reference run does);
otherwise softmax(logits / temperature), optional nucleus (top-p) truncation, and one draw from a
generator seeded by (seed, position) so a request is reproducible whichever tier answers it.
This file knows nothing of tiers or the network.
"""
from __future__ import annotations

import math

import torch

from relay.pb import pb

_MASK64 = (1 << 63) - 1


class PolicyError(ValueError):
    pass


def confidence(logits_V: torch.Tensor) -> tuple[float, float, float]:
    """(max_prob, entropy, margin) of softmax(logits_V)."""
    logp = torch.log_softmax(logits_V.double(), dim=-1)
    p = logp.exp()
    top = torch.topk(p, k=min(2, p.numel())).values
    entropy = float(-(p * logp).nan_to_num(0.0).sum())
    margin = float(top[0] - top[1]) if top.numel() > 1 else 1.0
    return float(top[0]), entropy, margin


def passes(policy: "pb.ExitPolicy", stats: tuple[float, float, float]) -> bool:
    max_prob, entropy, margin = stats
    k = policy.kind
    if k == pb.ExitPolicy.MAX_PROB:
        return max_prob >= policy.threshold
    if k == pb.ExitPolicy.ENTROPY:
        return entropy <= policy.threshold
    if k == pb.ExitPolicy.MARGIN:
        return margin >= policy.threshold
    return False


def validate(policy: "pb.ExitPolicy", sampling: "pb.Sampling") -> None:
    """Raise PolicyError for values no node should act on."""
    if policy.kind not in (pb.ExitPolicy.FIXED, pb.ExitPolicy.MAX_PROB, pb.ExitPolicy.ENTROPY, pb.ExitPolicy.MARGIN):
        raise PolicyError(f"unknown exit policy kind {policy.kind}")
    thr = policy.threshold
    if not math.isfinite(thr):
        raise PolicyError(f"exit policy threshold must be finite, got {thr}")
    if policy.kind in (pb.ExitPolicy.MAX_PROB, pb.ExitPolicy.MARGIN) and not 0.0 <= thr <= 1.0:
        raise PolicyError(f"max_prob/margin threshold must lie in [0, 1], got {thr}")
    if policy.kind == pb.ExitPolicy.ENTROPY and thr < 0.0:
        raise PolicyError(f"entropy threshold must be >= 0, got {thr}")
    if not (math.isfinite(sampling.temperature) and 0.0 <= sampling.temperature <= 100.0):
        raise PolicyError(f"temperature must lie in [0, 100], got {sampling.temperature}")
    if not (math.isfinite(sampling.top_p) and 0.0 <= sampling.top_p <= 1.0):
        raise PolicyError(f"top_p must lie in [0, 1], got {sampling.top_p}")


def sample(logits_V: torch.Tensor, sampling: "pb.Sampling", position: int) -> int:
    """One token from the logits at `position` (the position whose successor is being predicted)."""
    if sampling.temperature <= 0.0:
        return int(torch.argmax(logits_V))
    # Sampled on the CPU with a CPU generator, so a seed gives the same token on any tier and device.
    probs = torch.softmax(logits_V.detach().to("cpu", torch.float64) / sampling.temperature, dim=-1)
    if 0.0 < sampling.top_p < 1.0:
        p_sorted, idx = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = (torch.cumsum(p_sorted, 0) - p_sorted) < sampling.top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p_sorted[keep])
    gen = torch.Generator().manual_seed((int(sampling.seed) * 1_000_003 + int(position)) & _MASK64)
    return int(torch.multinomial(probs, 1, generator=gen))
