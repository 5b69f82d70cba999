"""`RequestRun`: one request driven through the engine, for either endpoint.

It turns the engine's `TokenOutput`s into text deltas (`detokenize.TextStream`: EOS, stop strings,
partial UTF-8), records each token's metrics, and keeps what the response reports of the request: the
exit and tier of every token, the latency split, replans, degradation, usage. An engine that fails
before the first token is a 503; one that fails later ends the text with finish_reason "error".
Response shapes are the handlers' (`serving_completion.py`, `serving_chat.py`); admission and SSE
framing are `serving_base.py`'s.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from serving.detokenize import TextStream
from serving.engine import Engine, EngineError, GenerateRequest, TokenOutput
from serving.errors import APIError
from serving.metrics import Metrics
from serving.protocol import FamilialInfo, LatencySplit, ReplanInfo, SpeculativeSummary, UsageInfo


@dataclass
class Delta:
    text: str
    exits: list[int]
    tiers: list[str]
    finish_reason: str | None = None
    first: int = 0                  # index of its first token in the completion


@dataclass
class RequestRun:
    engine: Engine
    metrics: Metrics
    req: GenerateRequest
    stops: list[str]
    exit_requested: object = "auto"
    queue_ms: float = 0.0
    exits: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    split: dict[str, float] = field(default_factory=dict)
    replans: list[ReplanInfo] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    infeasible: bool = False
    predicted_ms: float | None = None
    finish_reason: str | None = None
    e2e_ms: float = 0.0
    first_token_s: float | None = None
    draft: list[bool] = field(default_factory=list)      # speculative, per token (see FamilialInfo)
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    spec_planned: bool | None = None                     # the admission plan speculates
    tokens_per_round: float | None = None                # ... expecting this many tokens per round

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas; the last one carries finish_reason. Raises APIError(503) if nothing could be made."""
        pending_exits, pending_tiers = [], []
        last_s, last_text = None, None
        text = TextStream(self.engine.tokenizer, self.req.prompt_ids, self.stops, self.req.ignore_eos)
        gen = self.engine.generate(self.req)
        async with contextlib.aclosing(gen):
            try:
                async for out in gen:
                    last_s = self._record(out, last_s)
                    pending_exits.append(out.exit)
                    pending_tiers.append(out.tier)
                    delta = text.add(out.token_id, out.finish_reason)
                    if text.finish_reason:
                        self.finish_reason, last_text = text.finish_reason, delta
                        break
                    if delta:
                        yield Delta(delta, pending_exits, pending_tiers, first=len(self.exits) - len(pending_exits))
                        pending_exits, pending_tiers = [], []
            except EngineError as e:
                if not self.exits:
                    raise APIError(503, f"the model is unavailable: {e}", type="server_error",
                                   code="engine_unavailable") from e
                self.degraded.append(str(e))
                self.finish_reason = "error"   # cut short: never "stop", which would claim a finished answer
        if last_text is None:                  # the engine ended without a last token: failed or aborted
            last_text = text.flush()
        self._finish()
        yield Delta(last_text, pending_exits, pending_tiers, self.finish_reason or "stop",
                    first=len(self.exits) - len(pending_exits))

    def _record(self, out: TokenOutput, last_s: float | None) -> float:
        now = time.perf_counter()
        m = self.metrics
        if last_s is None:
            self.first_token_s = now
            m.ttft.observe(now - self.req.arrival_s)
        else:
            m.tpot.observe(now - last_s)
        self.exits.append(out.exit)
        self.tiers.append(out.tier)
        self.draft.append(out.draft)
        self.drafted.append(out.drafted)
        self.accepted.append(out.accepted)
        m.tokens_by_exit.labels(str(out.exit), out.tier).inc()
        if out.decision_us:
            m.decision.observe(out.decision_us / 1e6)
        for k, v in out.latency_ms.items():
            self.split[k] = self.split.get(k, 0.0) + v
        if out.degraded:
            self.degraded.append(out.reason or "degraded")
        if out.infeasible:
            self.infeasible = True
        if out.predicted_ms is not None:
            self.predicted_ms = round(out.predicted_ms, 3)
        if out.speculative is not None:
            self.spec_planned = out.speculative
            self.tokens_per_round = None if out.tokens_per_round is None else round(out.tokens_per_round, 3)
        if out.replan:
            self.replans.append(ReplanInfo.model_validate(out.replan, from_attributes=True))
        return now

    def _finish(self) -> None:
        m = self.metrics
        self.e2e_ms = (time.perf_counter() - self.req.arrival_s) * 1e3
        m.e2e.observe(self.e2e_ms / 1e3)
        m.prompt_tokens.inc(len(self.req.prompt_ids))
        m.generation_tokens.inc(len(self.exits))
        if self.req.budget_ms is not None:
            m.budget_requests.inc()
            if self.e2e_ms > self.req.budget_ms:
                m.budget_misses.inc()
        if self.infeasible:
            m.infeasible.inc()
        if self.replans:
            m.replans.inc(len(self.replans))
        if self.degraded:
            m.degraded.inc()

    # ---- response pieces -----------------------------------------------------------------------
    def usage(self) -> UsageInfo:
        n = len(self.exits)
        return UsageInfo(prompt_tokens=len(self.req.prompt_ids), completion_tokens=n,
                         total_tokens=len(self.req.prompt_ids) + n)

    def tokens_info(self, exits: list[int], tiers: list[str], first: int = 0) -> FamilialInfo:
        """The per-token part of `familial` for tokens [first, first + len(exits))."""
        info = FamilialInfo(exits=exits, tiers=tiers)
        if self.req.speculative is not None:
            end = first + len(exits)
            info.draft, info.drafted, info.accepted = (self.draft[first:end], self.drafted[first:end],
                                                       self.accepted[first:end])
        return info

    def summary(self, exits: list[int], tiers: list[str], first: int = 0) -> FamilialInfo:
        split = LatencySplit(queue=round(self.queue_ms, 3), total=round(self.e2e_ms, 3),
                             **{k: round(v, 3) for k, v in self.split.items()})
        budget = self.req.budget_ms
        info = self.tokens_info(exits, tiers, first).model_copy(update=dict(
            exit_requested=self.exit_requested, latency_budget_ms=budget,
            budget_met=None if budget is None else self.e2e_ms <= budget, predicted_ms=self.predicted_ms,
            infeasible=self.infeasible, replans=self.replans, degraded=bool(self.degraded),
            degraded_reasons=self.degraded or None, latency_ms=split))
        if self.req.speculative is not None:
            d, a = sum(self.drafted), sum(self.accepted)
            info.speculative = SpeculativeSummary(drafted=d, accepted=a, rounds=sum(1 for x in self.drafted if x),
                                                  acceptance=round(a / d, 4) if d else None, planned=self.spec_planned,
                                                  predicted_tokens_per_round=self.tokens_per_round)
        return info
