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

Speculative decoding (`verify_drafts`): drafts d_1..d_k from a draft distribution p_d, the target's
logits at k+1 rows (row i predicts the token d_{i+1} would be; row k the one after d_k). Greedy:
accept while argmax(row i) == d_{i+1}; the token after is the target's argmax there, so the output is
the target's own greedy output. Sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_{i+1}
with probability min(1, p_t(d)/p_d(d)); at the first rejection draw from
    norm(max(0, p_t - p_d)),
and after k acceptances draw the bonus token from p_t at row k; each emitted token is then distributed
exactly as the target's. p_t and p_d are both the *sampled* distributions (temperature and nucleus
applied, `probs`). The uniform and the residual draw have their own salts of (seed, position), so they
are independent of the draft's own Gumbel draw at that position.

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


_ACCEPT_SALT, _RESIDUAL_SALT = 0x5EC0_0001_A11C_E5ED, 0x5EC0_0002_0E51_D0A1


def probs(logits_NV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(N, V) float64: the distribution `sample` draws from with `params` (softmax(z/T) on the nucleus)."""
    z = logits_NV.double() / params.temperature
    if params.top_p < 1.0:
        z = _nucleus(z, torch.full((z.shape[0],), params.top_p, dtype=torch.float64, device=z.device))
    return torch.softmax(z, dim=-1)


def uniform(seed: int, position: int, salt: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, position, salt)."""
    return row_seed(int(seed) ^ salt, position) / 2.0**32


def verify_drafts(logits_nV: torch.Tensor, drafts: list[int], params: SamplingParams, first_pos: int,
                  draft_p_kV: torch.Tensor | None = None) -> tuple[int, int]:
    """(accepted a, token after them) for drafts d_1..d_k checked against the target's logits at
    k+1 rows; row i sits at position first_pos + i and predicts the token at first_pos + i + 1.
    draft_p_kV: the draft distributions the drafts were drawn from (sampling only)."""
    k = len(drafts)
    if logits_nV.shape[0] != k + 1:
        raise SamplingError(f"{k} drafts need {k + 1} target rows, got {logits_nV.shape[0]}")
    if params.greedy:
        tgt = logits_nV.argmax(-1).tolist()
        a = 0
        while a < k and tgt[a] == drafts[a]:
            a += 1
        return a, tgt[a]
    if draft_p_kV is None or draft_p_kV.shape[0] != k:
        raise SamplingError(f"sampled speculative decoding needs the draft distributions of all {k} drafts")
    p_t = probs(logits_nV, params)                                          # (k+1, V)
    p_d = draft_p_kV.to(p_t.device, torch.float64)                          # (k, V)
    for i, d in enumerate(drafts):
        pt, pd = float(p_t[i, d]), float(p_d[i, d])
        if pd > 0.0 and uniform(params.seed, first_pos + i, _ACCEPT_SALT) < min(1.0, pt / pd):
            continue
        resid = (p_t[i] - p_d[i]).clamp_min(0.0)
        if float(resid.sum()) <= 0.0:  # p_t == p_d up to rounding: nothing to correct
            resid = p_t[i]
        seed = row_seeds(torch.tensor([row_seed(int(params.seed) ^ _RESIDUAL_SALT, first_pos + i)],
                                      dtype=torch.int64, device=resid.device), 1, resid.device)
        g = gumbel_noise(seed, resid.shape[0])[0].double()
        return i, int((resid.log() + g).argmax())
    return k, sample(logits_nV[k:], [params], [first_pos + k])[0]
