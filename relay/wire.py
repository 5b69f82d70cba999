"""Protobuf <-> the engine's plain dataclasses (relay/work.py, trunk/sampling.py): the one place that
knows both. Hidden-state tensors go through relay/codec.py. Validation of what a peer sends happens on
the way in: anything a tier should not act on raises CodecError or SamplingError with a message.
"""
from __future__ import annotations

import math

import torch

from relay import codec
from relay.codec import CodecError
from relay.pb import pb
from relay.work import INF, GenRequest, Result, SeqStep, Speculative, StepMessage, StepReply, TokenEvent, Verify
from trunk.sampling import ENTROPY, FIXED, FIXED_POLICY, GREEDY, MARGIN, MAX_PROB, ExitPolicy, SamplingParams

_KIND_TO_PB = {FIXED: pb.ExitPolicy.FIXED, MAX_PROB: pb.ExitPolicy.MAX_PROB, ENTROPY: pb.ExitPolicy.ENTROPY,
               MARGIN: pb.ExitPolicy.MARGIN}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


# ---- sampling and policy -------------------------------------------------------------------------
def sampling_to_pb(s: SamplingParams) -> "pb.Sampling":
    return pb.Sampling(temperature=float(s.temperature), top_p=float(s.top_p), seed=int(s.seed))


def sampling_from_pb(m: "pb.Sampling") -> SamplingParams:
    if not (m.temperature or m.top_p or m.seed):  # unset: greedy, as most steps are
        return GREEDY
    top_p = m.top_p if m.top_p != 0.0 else 1.0  # unset on the wire
    return SamplingParams(float(m.temperature), float(top_p), int(m.seed)).validate()


def policy_to_pb(p: ExitPolicy) -> "pb.ExitPolicy":
    return pb.ExitPolicy(kind=_KIND_TO_PB[p.kind], threshold=float(p.threshold))


def policy_from_pb(m: "pb.ExitPolicy") -> ExitPolicy:
    if m.kind == pb.ExitPolicy.FIXED and not m.threshold:  # unset: a fixed exit, as most steps have
        return FIXED_POLICY
    if m.kind not in _KIND_FROM_PB:
        raise CodecError(f"unknown exit policy kind {m.kind}")
    return ExitPolicy(_KIND_FROM_PB[m.kind], float(m.threshold)).validate()


# ---- timings and confidence ----------------------------------------------------------------------
def timings_to_pb(timings: dict[str, float]) -> tuple[list, list]:
    tiers, hops = [], []
    for k, v in timings.items():
        if k.startswith("net:"):
            src, _, dst = k[4:].partition("->")
            hops.append(pb.HopTiming(src=src, dst=dst, net_ms=v))
        else:
            tiers.append(pb.TierTiming(tier=k, compute_ms=v))
    return tiers, hops


def timings_from_pb(tiers, hops) -> dict[str, float]:
    out = {t.tier: t.compute_ms for t in tiers}
    out.update({f"net:{h.src}->{h.dst}": h.net_ms for h in hops})
    return out


def confidence_to_pb(conf) -> list:
    return [pb.ExitConfidence(exit=g, max_prob=a, entropy=b, margin=c) for g, a, b, c in conf]


def confidence_from_pb(conf) -> list[tuple[int, float, float, float]]:
    return [(c.exit, c.max_prob, c.entropy, c.margin) for c in conf]


# ---- step messages -------------------------------------------------------------------------------
def step_to_pb(msg: StepMessage, wire: str) -> "pb.StepRequest":
    seqs = []
    for s in msg.seqs:
        m = pb.SeqStep(seq_id=s.seq_id, pos=s.pos, count=s.count, fill_only=s.fill_only,
                       deadline_ms=s.deadline_ms if math.isfinite(s.deadline_ms) else 0.0)
        if s.policy != FIXED_POLICY:  # the defaults go unset (they read back as themselves)
            m.policy.CopyFrom(policy_to_pb(s.policy))
        if s.sampling != GREEDY:
            m.sampling.CopyFrom(sampling_to_pb(s.sampling))
        if s.want is not None:
            m.max_exit = s.want
        if s.verify is not None:
            m.drafts.extend(s.verify.drafts)
            if s.verify.draft_p is not None:
                m.draft_p.CopyFrom(codec.encode(s.verify.draft_p.float()[None], "float32"))
        seqs.append(m)
    return pb.StepRequest(seqs=seqs, hidden=codec.encode(msg.hidden[None], wire), src=msg.src)


def step_from_pb(req: "pb.StepRequest", d_model: int, out_dtype, max_rows: int, G: int) -> StepMessage:
    if not req.seqs:
        raise CodecError("a step message needs at least one sequence")
    h = codec.decode(req.hidden, d_model=d_model, out_dtype=out_dtype, max_positions=max_rows)[0]  # (N, D)
    seqs, total = [], 0
    for m in req.seqs:
        if not m.seq_id or len(m.seq_id) > 256:
            raise CodecError("seq_id must be 1..256 characters")
        if m.pos < 0 or m.count < 1:
            raise CodecError(f"sequence {m.seq_id!r}: pos must be >= 0 and count >= 1, got {m.pos}, {m.count}")
        if m.HasField("max_exit") and not 0 <= m.max_exit < G:
            raise CodecError(f"sequence {m.seq_id!r}: exit {m.max_exit} out of range 0..{G - 1}")
        if not (math.isfinite(m.deadline_ms) and m.deadline_ms >= 0):
            raise CodecError(f"sequence {m.seq_id!r}: deadline_ms must be finite and >= 0")
        total += m.count
        seqs.append(SeqStep(m.seq_id, int(m.pos), int(m.count), m.max_exit if m.HasField("max_exit") else None,
                            policy_from_pb(m.policy), sampling_from_pb(m.sampling), m.fill_only,
                            m.deadline_ms if m.deadline_ms > 0 else INF, _verify_from_pb(m)))
    if total != h.shape[0]:
        raise CodecError(f"sequences bring {total} rows but the hidden states have {h.shape[0]}")
    return StepMessage(seqs, h, req.src)


def _verify_from_pb(m: "pb.SeqStep") -> Verify | None:
    if not m.drafts:
        return None
    k = len(m.drafts)
    if m.count < k + 1 or not m.HasField("max_exit") or m.fill_only:
        raise CodecError(f"sequence {m.seq_id!r}: a verify of {k} drafts needs an exit and >= {k + 1} rows")
    if any(t < 0 for t in m.drafts):
        raise CodecError(f"sequence {m.seq_id!r}: draft token ids must be >= 0")
    p = None
    if m.HasField("draft_p"):
        p = codec.decode(m.draft_p, out_dtype=torch.float32, max_positions=k)[0]  # (k, V)
        if p.shape[0] != k or bool((p < 0).any()):
            raise CodecError(f"sequence {m.seq_id!r}: draft_p must be {k} non-negative distributions")
    elif not sampling_from_pb(m.sampling).greedy:
        raise CodecError(f"sequence {m.seq_id!r}: a sampled verify needs the draft distributions (draft_p)")
    return Verify([int(t) for t in m.drafts], p)


def result_to_pb(r: Result) -> "pb.SeqResult":
    tiers, hops = timings_to_pb(r.timings)
    code, err = r.error or ("", "")
    return pb.SeqResult(token=r.token, exit=r.exit, tier=r.tier, degraded=r.degraded, reason=r.reason,
                        confidence=confidence_to_pb(r.confidence), tiers=tiers, hops=hops, length=r.length,
                        total_ms=r.total_ms, error_code=code, error=err, drafted=r.drafted, accepted=r.accepted)


def result_from_pb(m: "pb.SeqResult") -> Result:
    return Result(int(m.token), int(m.exit), m.tier, m.degraded, m.reason, confidence_from_pb(m.confidence),
                  timings_from_pb(m.tiers, m.hops), int(m.length), (m.error_code, m.error) if m.error_code else None,
                  m.total_ms, int(m.drafted), int(m.accepted))


def reply_to_pb(r: StepReply) -> "pb.StepReply":
    return pb.StepReply(results=[result_to_pb(x) for x in r.results], tier=r.tier)


def reply_from_pb(m: "pb.StepReply", n: int) -> StepReply:
    if len(m.results) != n:
        raise CodecError(f"step reply has {len(m.results)} results for {n} sequences")
    return StepReply([result_from_pb(x) for x in m.results], m.tier)


# ---- generate ------------------------------------------------------------------------------------
def gen_to_pb(g: GenRequest, deadline_ms: float = 0.0) -> "pb.GenerateRequest":
    m = pb.GenerateRequest(request_id=g.request_id, prompt_ids=g.prompt_ids, max_tokens=g.max_tokens,
                           sampling=sampling_to_pb(g.sampling), policy=policy_to_pb(g.policy),
                           ignore_eos=g.ignore_eos, eos_ids=list(g.eos_ids), deadline_ms=deadline_ms,
                           step_timeout_ms=(g.step_timeout_s or 0.0) * 1e3)
    if g.exit is not None:
        m.exit = g.exit
    if g.speculative is not None:
        sp = g.speculative
        m.speculative.k, m.speculative.fixed_k = sp.k, not sp.adaptive
        if sp.draft_exit is not None:
            m.speculative.draft_exit = sp.draft_exit
    return m


def speculative_from_pb(m: "pb.GenerateRequest") -> Speculative | None:
    if not m.HasField("speculative"):
        return None
    sp = m.speculative
    return Speculative(sp.draft_exit if sp.HasField("draft_exit") else None, sp.k or 4, not sp.fixed_k)


def gen_from_pb(m: "pb.GenerateRequest", now: float) -> GenRequest:
    if not m.request_id or len(m.request_id) > 256:
        raise CodecError("request_id must be 1..256 characters")
    for name in ("deadline_ms", "step_timeout_ms"):
        v = getattr(m, name)
        if not (math.isfinite(v) and v >= 0):
            raise CodecError(f"{name} must be finite and >= 0, got {v}")
    return GenRequest(m.request_id, [int(t) for t in m.prompt_ids], int(m.max_tokens), sampling_from_pb(m.sampling),
                      m.exit if m.HasField("exit") else None, policy_from_pb(m.policy), m.ignore_eos,
                      tuple(int(t) for t in m.eos_ids), now + m.deadline_ms / 1e3 if m.deadline_ms > 0 else INF,
                      m.step_timeout_ms / 1e3 if m.step_timeout_ms > 0 else None, speculative_from_pb(m))


def event_to_pb(request_id: str, e: TokenEvent) -> "pb.TokenEvent":
    tiers, hops = timings_to_pb(e.timings)
    return pb.TokenEvent(request_id=request_id, token=e.token, exit=e.exit, tier=e.tier, index=e.index,
                         degraded=e.degraded, reason=e.reason, tiers=tiers, hops=hops,
                         confidence=confidence_to_pb(e.confidence), finish_reason=e.finish_reason or "", error=e.error,
                         draft=e.draft, drafted=e.drafted, accepted=e.accepted)


def event_from_pb(m: "pb.TokenEvent") -> TokenEvent:
    return TokenEvent(int(m.token), int(m.exit), m.tier, int(m.index), m.degraded, m.reason,
                      timings_from_pb(m.tiers, m.hops), confidence_from_pb(m.confidence), m.finish_reason or None,
                      m.error, m.draft, int(m.drafted), int(m.accepted))
