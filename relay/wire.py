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
# Written as columns (pb.SeqColumns / pb.ResultColumns: one protobuf message per step, not one per
# sequence); read from columns or, from an older peer, from one message per sequence.
def step_to_pb(msg: StepMessage, wire: str) -> "pb.StepRequest":
    seqs = msg.seqs
    cols = pb.SeqColumns(seq_id=[s.seq_id for s in seqs], pos=[s.pos for s in seqs], count=[s.count for s in seqs],
                         max_exit=[-1 if s.want is None else s.want for s in seqs],
                         deadline_ms=[s.deadline_ms if math.isfinite(s.deadline_ms) else 0.0 for s in seqs])
    if any(s.fill_only for s in seqs):
        cols.fill_only.extend([s.fill_only for s in seqs])
    for i, s in enumerate(seqs):
        # the defaults go unset (identity first: most sequences share the module's default objects)
        policy = s.policy is not FIXED_POLICY and s.policy != FIXED_POLICY
        sampling = s.sampling is not GREEDY and s.sampling != GREEDY
        if not (policy or sampling or s.verify is not None):
            continue
        x = cols.extras.add(index=i)
        if policy:
            x.policy.CopyFrom(policy_to_pb(s.policy))
        if sampling:
            x.sampling.CopyFrom(sampling_to_pb(s.sampling))
        if s.verify is not None:
            x.drafts.extend(s.verify.drafts)
            if s.verify.draft_p is not None:
                x.draft_p.CopyFrom(codec.encode(s.verify.draft_p.float()[None], "float32"))
    req = pb.StepRequest(cols=cols, src=msg.src)
    codec.encode(msg.hidden[None], wire, out=req.hidden)
    return req


def _check_seq(seq_id: str, pos: int, count: int, max_exit: int | None, deadline_ms: float, G: int) -> None:
    if not seq_id or len(seq_id) > 256:
        raise CodecError("seq_id must be 1..256 characters")
    if pos < 0 or count < 1:
        raise CodecError(f"sequence {seq_id!r}: pos must be >= 0 and count >= 1, got {pos}, {count}")
    if max_exit is not None and not 0 <= max_exit < G:
        raise CodecError(f"sequence {seq_id!r}: exit {max_exit} out of range 0..{G - 1}")
    if not (math.isfinite(deadline_ms) and deadline_ms >= 0):
        raise CodecError(f"sequence {seq_id!r}: deadline_ms must be finite and >= 0")


def _seqs_from_columns(c: "pb.SeqColumns", G: int) -> list[SeqStep]:
    ids, pos, count, mx, dl, fo = c.seq_id, c.pos, c.count, c.max_exit, c.deadline_ms, c.fill_only
    n = len(ids)
    if not len(pos) == len(count) == len(mx) == len(dl) == n or len(fo) not in (0, n):
        raise CodecError("step columns must hold one entry per sequence each")
    # the common case checked column-wide; a failure is then found and named sequence by sequence
    if (min(pos) < 0 or min(count) < 1 or min(mx) < -1 or max(mx) >= G or max(map(len, ids)) > 256
            or not all(ids) or not all(0 <= x < INF for x in dl)):
        for i in range(n):
            _check_seq(ids[i], pos[i], count[i], mx[i] if mx[i] != -1 else None, dl[i], G)
    seqs = [SeqStep(sid, p, k, None if m == -1 else m, FIXED_POLICY, GREEDY, False, d if d > 0 else INF)
            for sid, p, k, m, d in zip(ids, pos, count, mx, dl)]
    if len(fo):
        for s, f in zip(seqs, fo):
            s.fill_only = f
    seen = set()
    for x in c.extras:
        if not 0 <= x.index < n or x.index in seen:
            raise CodecError(f"step columns: extra for sequence {x.index} of {n}")
        seen.add(x.index)
        s = seqs[x.index]
        s.policy, s.sampling = policy_from_pb(x.policy), sampling_from_pb(x.sampling)
        s.verify = _verify_from_pb(x, s.seq_id, s.count, s.want, s.fill_only)
    return seqs


def step_from_pb(req: "pb.StepRequest", d_model: int, out_dtype, max_rows: int, G: int) -> StepMessage:
    if req.cols.seq_id:
        seqs = _seqs_from_columns(req.cols, G)
    elif req.seqs:
        seqs = []
        for m in req.seqs:
            want = m.max_exit if m.HasField("max_exit") else None
            _check_seq(m.seq_id, m.pos, m.count, want, m.deadline_ms, G)
            seqs.append(SeqStep(m.seq_id, int(m.pos), int(m.count), want, policy_from_pb(m.policy),
                                sampling_from_pb(m.sampling), m.fill_only, m.deadline_ms if m.deadline_ms > 0 else INF,
                                _verify_from_pb(m, m.seq_id, m.count, want, m.fill_only)))
    else:
        raise CodecError("a step message needs at least one sequence")
    h = codec.decode(req.hidden, d_model=d_model, out_dtype=out_dtype, max_positions=max_rows)[0]  # (N, D)
    total = sum(s.count for s in seqs)
    if total != h.shape[0]:
        raise CodecError(f"sequences bring {total} rows but the hidden states have {h.shape[0]}")
    return StepMessage(seqs, h, req.src)


def _verify_from_pb(m, seq_id: str, count: int, want: int | None, fill_only: bool) -> Verify | None:
    """A speculative verify from a SeqStep or a SeqExtra (`drafts`, `draft_p`, `sampling`)."""
    if not m.drafts:
        return None
    k = len(m.drafts)
    if count < k + 1 or want is None or fill_only:
        raise CodecError(f"sequence {seq_id!r}: a verify of {k} drafts needs an exit and >= {k + 1} rows")
    if any(t < 0 for t in m.drafts):
        raise CodecError(f"sequence {seq_id!r}: draft token ids must be >= 0")
    p = None
    if m.HasField("draft_p"):
        p = codec.decode(m.draft_p, out_dtype=torch.float32, max_positions=k)[0]  # (k, V)
        if p.shape[0] != k or bool((p < 0).any()):
            raise CodecError(f"sequence {seq_id!r}: draft_p must be {k} non-negative distributions")
    elif not sampling_from_pb(m.sampling).greedy:
        raise CodecError(f"sequence {seq_id!r}: a sampled verify needs the draft distributions (draft_p)")
    return Verify([int(t) for t in m.drafts], p)


def result_from_pb(m: "pb.SeqResult") -> Result:
    """An older peer's per-sequence result (nodes now answer with ResultColumns)."""
    return Result(int(m.token), int(m.exit), m.tier, m.degraded, m.reason, confidence_from_pb(m.confidence),
                  timings_from_pb(m.tiers, m.hops), int(m.length), (m.error_code, m.error) if m.error_code else None,
                  m.total_ms, int(m.drafted), int(m.accepted))


def reply_to_pb(r: StepReply) -> "pb.StepReply":
    res = r.results
    names: dict[str, int] = {}
    key = lambda k: names.setdefault(k, len(names))  # noqa: E731 - an index per distinct name
    tier = [key(x.tier) for x in res]
    n_conf, conf = [len(x.confidence) for x in res], [c for x in res for c in x.confidence]
    n_timing, t_keys, t_ms = [len(x.timings) for x in res], [], []
    for x in res:
        for k, v in x.timings.items():
            t_keys.append(key(k))
            t_ms.append(v)
    cols = pb.ResultColumns(
        token=[x.token for x in res], exit=[x.exit for x in res], tier=tier, degraded=[x.degraded for x in res],
        length=[x.length for x in res], total_ms=[x.total_ms for x in res], n_conf=n_conf,
        conf_exit=[c[0] for c in conf], conf_max_prob=[c[1] for c in conf], conf_entropy=[c[2] for c in conf],
        conf_margin=[c[3] for c in conf], n_timing=n_timing, timing_key=t_keys, timing_ms=t_ms)
    if any(x.drafted for x in res):
        cols.drafted.extend([x.drafted for x in res])
        cols.accepted.extend([x.accepted for x in res])
    cols.names.extend(names)
    for i, x in enumerate(res):
        if x.reason or x.error:
            code, err = x.error or ("", "")
            cols.notes.add(index=i, reason=x.reason, error_code=code, error=err)
    return pb.StepReply(cols=cols, tier=r.tier)


def _results_from_columns(c: "pb.ResultColumns", n: int) -> list[Result]:
    # every column read once (each read of a repeated field makes a new wrapper)
    tok, ex, tier, deg, ln, tot, dr, ac = c.token, c.exit, c.tier, c.degraded, c.length, c.total_ms, c.drafted, c.accepted
    n_conf, ce, cp, cn, cm = c.n_conf, c.conf_exit, c.conf_max_prob, c.conf_entropy, c.conf_margin
    n_timing, tk, tm, names = c.n_timing, c.timing_key, c.timing_ms, list(c.names)
    if (not len(tok) == len(ex) == len(tier) == len(deg) == len(ln) == len(tot) == len(n_conf) == len(n_timing) == n
            or len(dr) not in (0, n) or len(ac) != len(dr)):
        raise CodecError(f"step reply columns must hold {n} entries each")
    nc, nt, N = sum(n_conf), sum(n_timing), len(names)
    if (not len(ce) == len(cp) == len(cn) == len(cm) == nc or not len(tk) == len(tm) == nt
            or (n and min(min(n_conf), min(n_timing)) < 0) or any(not 0 <= k < N for k in tier)
            or any(not 0 <= k < N for k in tk)):
        raise CodecError("step reply columns are inconsistent")
    conf = list(zip(ce, cp, cn, cm))
    timing = [(names[k], v) for k, v in zip(tk, tm)]
    dr, ac = (dr, ac) if len(dr) else ((0,) * n, (0,) * n)
    out, a, b = [], 0, 0
    for t, d, l_, s_, k, m, x, y, z, w in zip(tok, ex, tier, deg, n_conf, n_timing, ln, tot, dr, ac):
        out.append(Result(t, d, names[l_], s_, "", conf[a:a + k], dict(timing[b:b + m]), x, None, y, z, w))
        a, b = a + k, b + m
    for note in c.notes:
        if not 0 <= note.index < n:
            raise CodecError(f"step reply note for result {note.index} of {n}")
        r = out[note.index]
        r.reason, r.error = note.reason, (note.error_code, note.error) if note.error_code else None
    return out


def reply_from_pb(m: "pb.StepReply", n: int) -> StepReply:
    if m.HasField("cols"):
        return StepReply(_results_from_columns(m.cols, n), m.tier)
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
