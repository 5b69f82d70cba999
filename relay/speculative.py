"""Speculative decoding at the head tier: a request's round state and how many drafts a round takes.

A round (relay/tier.py drives it): the head drafts d_1..d_k with the draft exit, one local step each
(no network), then sends ONE verify item whose input is d_k; it travels to the target exit's tier with
the pending boundary states of all k+1 positions, as any deep step does, and the target checks every
draft in one batched forward (trunk.sampling.verify_drafts). Accepted a of k, the round yields a + 1
tokens and every tier cuts its cache and boundary log back to the accepted prefix on the way back.

Draft length (adaptive): with per-draft acceptance rate alpha, a round of k drafts yields
    E(k) = (1 - alpha^(k+1)) / (1 - alpha)
tokens and costs k * t_draft + t_verify (t_verify: the verify's round trip, network and deeper tiers
included). k is the one in [1, cap] that maximises E(k) / cost(k); alpha, t_draft and t_verify are
decayed running estimates of this request (alpha starts from a weak prior of 0.6).

This file knows nothing of pools, stages or the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from relay.work import Speculative

DECAY = 0.8           # weight of the past in the running estimates, per round
PRIOR_ALPHA = 0.6     # acceptance rate assumed before the first round ...
PRIOR_TRIALS = 2.0    # ... worth this many drafts


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round of k drafts yields when each draft is accepted with probability alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def choose_k(alpha: float, t_draft_ms: float, t_verify_ms: float, cap: int) -> int:
    """The draft length in [1, cap] with the most tokens per millisecond."""
    best, best_rate = 1, -1.0
    for k in range(1, max(1, cap) + 1):
        rate = expected_tokens(alpha, k) / max(1e-6, k * t_draft_ms + t_verify_ms)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


@dataclass
class SpecState:
    """One request's speculative state at the head."""
    conf: Speculative
    draft_exit: int
    drafts: list[int] = field(default_factory=list)           # this round's drafts so far
    draft_p: list[torch.Tensor] = field(default_factory=list)  # their distributions (sampling)
    round_k: int = 0                                           # drafts this round takes
    accepted_w: float = PRIOR_ALPHA * PRIOR_TRIALS             # decayed accepted drafts
    trials_w: float = PRIOR_TRIALS                             # decayed drafts judged (accepted + first rejected)
    t_draft_ms: float | None = None
    t_verify_ms: float | None = None
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    round_t0: float = 0.0                                      # perf_counter when the verify left

    @property
    def alpha(self) -> float:
        return self.accepted_w / self.trials_w

    def next_k(self, remaining: int) -> int:
        """Drafts for the round that starts now, leaving room for the token the verify adds."""
        cap = self.conf.k
        if self.conf.adaptive and self.t_draft_ms is not None and self.t_verify_ms is not None:
            cap = choose_k(self.alpha, self.t_draft_ms, self.t_verify_ms, self.conf.k)
        return max(0, min(cap, remaining - 1))

    def observe_draft(self, ms: float) -> None:
        self.t_draft_ms = ms if self.t_draft_ms is None else DECAY * self.t_draft_ms + (1 - DECAY) * ms

    def observe_round(self, k: int, a: int, verify_ms: float) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += a
        self.accepted_w = DECAY * self.accepted_w + a
        self.trials_w = DECAY * self.trials_w + a + (1 if a < k else 0)
        self.t_verify_ms = verify_ms if self.t_verify_ms is None else DECAY * self.t_verify_ms + (1 - DECAY) * verify_ms
