"""What crosses between tiers and into a tier engine: work items, step messages, results, token events.

Plain dataclasses, no transport: the gRPC servicer (relay/node.py) converts them to and from protobuf,
the in-process chain passes them as they are. A tier engine (relay/tier.py) consumes `Item`s (rows of
one sequence) and `GenRequest`s (whole requests whose decode loop runs in the head engine).

Legend: n rows of one sequence, N rows of a message, D d_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from trunk.sampling import GREEDY, FIXED_POLICY, ExitPolicy, SamplingParams

INF = math.inf


class EngineError(RuntimeError):
    """code is a gRPC status name (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED,
    UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED)."""

    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code = code


@dataclass(slots=True)
class Result:
    """What a tier answers for one item: a token from some exit, or an error."""
    token: int = -1
    exit: int = -1
    tier: str = ""
    degraded: bool = False
    reason: str = ""
    confidence: list[tuple[int, float, float, float]] = field(default_factory=list)  # (exit, max_prob, entropy, margin)
    timings: dict[str, float] = field(default_factory=dict)  # ms: tier -> time there, "net:a->b" -> hop
    length: int = 0                       # positions the answering tier's first segment holds afterwards
    error: tuple[str, str] | None = None  # (status code name, message)
    total_ms: float = 0.0                 # time at the tier that made this result (its own and deeper)
    drafted: int = 0                      # a verify: drafts checked (0: not a verify)
    accepted: int = 0                     # a verify: drafts accepted; `token` is the one after them
    draft_p: torch.Tensor | None = None   # a sampled draft step at the head: (V,) the draft distribution

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Verify:
    """A speculative verify: the item's last k+1 rows are positions [e-k-1, e), e its end; row i predicts
    the token after it, which draft d_{i+1} guessed. The exit asked for (`want`) is the target."""
    drafts: list[int]                         # d_1..d_k (d_i is the input token at position e-k-1+i)
    draft_p: torch.Tensor | None = None       # (k, V) the draft distributions (sampling only)

    @property
    def rows(self) -> int:
        return len(self.drafts) + 1


@dataclass
class SeqStep:
    """One sequence's rows in a step message to the next tier (its rows are a slice of the message's tensor)."""
    seq_id: str
    pos: int
    count: int
    want: int | None = None
    policy: ExitPolicy = FIXED_POLICY
    sampling: SamplingParams = GREEDY
    fill_only: bool = False
    deadline_ms: float = INF          # time left for this sequence when the message was sent
    verify: Verify | None = None      # a speculative verify of its last rows


@dataclass
class StepMessage:
    seqs: list[SeqStep]
    hidden: torch.Tensor              # (N, D) rows of every sequence, in order
    src: str = ""                     # sender: its tier in process; over gRPC its node id (relay/node.py)


@dataclass
class StepReply:
    results: list[Result]             # one per SeqStep, same order
    tier: str = ""
    local_ms: float = 0.0             # of the round trip, the sender's own part: encoding the step, which
                                      # waits for its kernels and copies the hidden states to the host


@dataclass(slots=True, eq=False)
class Item:
    """Rows of one sequence to run at this tier, and where its result goes."""
    seq_id: str
    pos: int
    x: torch.Tensor | list            # (n,) token ids at the head (a tensor or a list), else (n, D) boundary states
    want: int | None                  # global exit asked for; None = no answer wanted (fill)
    policy: ExitPolicy = FIXED_POLICY
    sampling: SamplingParams = GREEDY
    fill_only: bool = False
    deadline: float = INF             # time.monotonic() by which an answer is due
    sink: Callable[["Item", Result], None] | None = None
    arrival: float = 0.0              # time.perf_counter() when the tier got it
    done: int = 0                     # rows already run (a long prefill runs in chunks)
    resolved: bool = False
    tag: object = None                # the sink's own bookkeeping
    must_answer: bool = False         # never refused for a passed deadline (the head's own requests)
    done_cb: Callable | None = None   # the engine's bookkeeping, called before `sink`
    tag_seq: object = None            # the engine's state of this item's sequence
    verify: Verify | None = None      # a speculative verify (the answer is `accepted` drafts + a token)
    draft: bool = False               # a speculative draft step at the head (sampled: keep the draft distribution)

    @property
    def n(self) -> int:
        return len(self.x) if isinstance(self.x, list) else int(self.x.shape[0])

    def resolve(self, result: Result) -> None:
        if self.resolved:
            return
        self.resolved = True
        if self.done_cb is not None:
            self.done_cb(self, result)
        elif self.sink is not None:
            self.sink(self, result)


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding of a request: the head drafts with a shallow exit, the target exit verifies."""
    draft_exit: int | None = None      # None: the head tier's deepest exit (must be on the head tier)
    k: int = 4                         # drafts per round (the cap when adaptive)
    adaptive: bool = True              # choose k per round from the acceptance rate and the round's cost


@dataclass
class GenRequest:
    """A whole request for the head engine: its decode loop runs there, one token event per step."""
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    exit: int | None = None            # exit asked for; None = the deepest
    policy: ExitPolicy = FIXED_POLICY
    ignore_eos: bool = False
    eos_ids: tuple[int, ...] = ()
    deadline: float = INF              # time.monotonic() by which the whole request should end
    step_timeout_s: float | None = None  # per-step deadline when no budget is given (engine default if None)
    speculative: Speculative | None = None  # None: one target step per token


@dataclass(slots=True)
class TokenEvent:
    token: int
    exit: int
    tier: str
    index: int                         # 0-based position in the completion
    degraded: bool = False
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    confidence: list[tuple[int, float, float, float]] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" (EOS) | "length" (max_tokens) | "abort" | "error"
    error: str = ""
    draft: bool = False                # speculative: an accepted draft (else the target's token or a plain step)
    drafted: int = 0                   # speculative: on the token that closes a round, drafts checked in it
    accepted: int = 0                  # ... and how many were accepted (sums over events are the totals)
