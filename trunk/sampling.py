"""Sampling parameters, exit policies, confidence statistics and batched sampling: one home for each.

Every tier (PyTorch stage, ONNX device tier, the in-process engine) imports these, so a request draws
the same token whichever tier answers it and whatever batch it rides in.

Confidence of a distribution p = softmax(z) over the vocabulary (fp32, per row):
    max_prob = max_i p_i,   entropy = -sum_i p_i log p_i (nats),   margin = p_(1) - p_(2).
A confidence policy exits at the first exit (shallow to deep, up to the deepest wanted) whose statistic
passes: max_prob >= thr, entropy <= thr, margin >= thr. FIXED answers from the exit asked for.

Sampling: temperature 0 is greedy (argmax, lowest index on ties). Otherwise a Gumbel-max draw
    token = argmax_{i in nucleus} (z_i / T + g_i),   g_i = -log(-log u(seed_row, i))
which is an exact draw from softmax(z / T) restricted to the nucleus (the smallest set of most likely
tokens whose mass reaches top_p; at least the top token). The noise u is a counter-based hash of
(row seed, vocabulary index), the same function as the fused exit-head kernel's (kernels/exit_head.py),
and the row seed mixes the request's seed with the position being predicted: the draw depends only on
(seed, position, logits). This file knows nothing of tiers, pools or the network.

Legend: N rows, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.exit_head import gumbel_noise, row_seeds

FIXED, MAX_PROB, ENTROPY, MARGIN = "fixed", "max_prob", "entropy", "margin"
POLICY_KINDS = (FIXED, MAX_PROB, ENTROPY, MARGIN)
_M64 = (1 << 64) - 1


class SamplingError(ValueError):
    """A sampling parameter or exit policy no tier should act on; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0         # nucleus mass kept (float64, never rounded): 1 = all, tiny = the top token
    seed: int = 0              # 0 <= seed < 2^64; the draw at position p depends only on (seed, p)

    def validate(self) -> "SamplingParams":
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise SamplingError(f"temperature must lie in [0, 100], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not 0 <= int(self.seed) <= _M64:
            raise SamplingError(f"seed must lie in [0, 2^64), got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class ExitPolicy:
    kind: str = FIXED        # fixed | max_prob | entropy | margin
    threshold: float = 0.0   # max_prob/margin: exit when >= threshold; entropy (nats): exit when <= threshold

    def validate(self) -> "ExitPolicy":
        if self.kind not in POLICY_KINDS:
            raise SamplingError(f"unknown exit policy {self.kind!r}; known: {', '.join(POLICY_KINDS)}")
        thr = self.threshold
        if not math.isfinite(thr):
            raise SamplingError(f"exit policy threshold must be finite, got {thr}")
        if self.kind in (MAX_PROB, MARGIN) and not 0.0 <= thr <= 1.0:
            raise SamplingError(f"max_prob/margin threshold must lie in [0, 1], got {thr}")
        if self.kind == ENTROPY and thr < 0.0:
            raise SamplingError(f"entropy threshold must be >= 0, got {thr}")
        return self


GREEDY = SamplingParams()
FIXED_POLICY = ExitPolicy()


def confidence(logits_NV: torch.Tensor) -> torch.Tensor:
    """(N, 3) float32: max_prob, entropy, margin of softmax(logits) per row."""
    logp = torch.log_softmax(logits_NV.float(), dim=-1)
    p = logp.exp()
    top = torch.topk(p, k=min(2, p.shape[-1]), dim=-1).values
    entropy = -(p * logp).nan_to_num(0.0).sum(-1)
    margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else torch.ones_like(top[:, 0])
    return torch.stack([top[:, 0], entropy, margin], dim=-1)


def passes(policy: ExitPolicy, stats: tuple[float, float, float]) -> bool:
    max_prob, entropy, margin = stats
    if policy.kind == MAX_PROB:
        return max_prob >= policy.threshold
    if policy.kind == ENTROPY:
        return entropy <= policy.threshold
    if policy.kind == MARGIN:
        return margin >= policy.threshold
    return False


def row_seed(seed: int, position: int) -> int:
    """32-bit seed of the draw that predicts the token after `position` (splitmix64 of both)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(position) + 0x632BE59BD9B4E019) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) & 0xFFFFFFFF


def sample(logits_NV: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row: row r predicts the token after positions[r] with params[r]."""
    N = logits_NV.shape[0]
    if N == 0:
        return []
    tokens = logits_NV.argmax(-1)
    hot = [r for r in range(N) if not params[r].greedy]
    if hot:
        idx = torch.tensor(hot, device=logits_NV.device)
        z = logits_NV.index_select(0, idx).float()
        inv_t = torch.tensor([1.0 / params[r].temperature for r in hot], device=z.device)[:, None]
        scaled = z * inv_t
        top_p = [params[r].top_p for r in hot]
        if any(p < 1.0 for p in top_p):
            scaled = _nucleus(scaled, torch.tensor(top_p, dtype=torch.float64, device=z.device))
        seeds = row_seeds(torch.tensor([row_seed(params[r].seed, positions[r]) for r in hot],
                                       dtype=torch.int64, device=z.device), len(hot), z.device)
        drawn = (scaled + gumbel_noise(seeds, z.shape[1])).argmax(-1)
        tokens = tokens.index_copy(0, idx, drawn)
    return tokens.tolist()


def _nucleus(scaled_NV: torch.Tensor, top_p_N: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's nucleus: the smallest prefix of tokens, most likely first, whose
    probability mass reaches top_p (computed in float64, so a tiny top_p keeps exactly the top token)."""
    p = torch.softmax(scaled_NV.double(), dim=-1)
    p_sorted, order = torch.sort(p, dim=-1, descending=True)
    before = torch.cumsum(p_sorted, dim=-1) - p_sorted      # mass of the tokens ranked above
    keep_sorted = before < top_p_N[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return scaled_NV.masked_fill(~keep, float("-inf"))
