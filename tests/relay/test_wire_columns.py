"""relay/wire.py's step messages as columns: every field round-trips through protobuf bytes, older peers'
per-sequence messages still read, and malformed columns fail with a CodecError naming the problem."""
import math

import pytest
import torch

from relay import wire
from relay.codec import CodecError
from relay.pb import pb
from relay.work import INF, Result, SeqStep, StepMessage, StepReply, Verify
from trunk.sampling import ExitPolicy, SamplingParams

D, G = 16, 4


def _through_bytes(m):
    return type(m).FromString(m.SerializeToString())


def _message() -> StepMessage:
    seqs = [SeqStep("plain", 10, 1, 3, deadline_ms=250.0),
            SeqStep("fill", 0, 5, None, fill_only=True),
            SeqStep("policy", 7, 2, 2, policy=ExitPolicy("max_prob", 0.8), sampling=SamplingParams(0.7, 0.9, 42)),
            SeqStep("verify-greedy", 3, 3, 3, verify=Verify([5, 6])),
            SeqStep("verify-sampled", 3, 2, 1, sampling=SamplingParams(1.0, 1.0, 7),
                    verify=Verify([9], torch.softmax(torch.randn(1, 11), -1)))]
    n = sum(s.count for s in seqs)
    return StepMessage(seqs, torch.randn(n, D), src="node-a")


def test_step_round_trips_every_field_as_columns():
    msg = _message()
    req = _through_bytes(wire.step_to_pb(msg, "float32"))
    assert len(req.cols.seq_id) == 5 and not req.seqs  # written as columns only
    assert [x.index for x in req.cols.extras] == [2, 3, 4]  # only the sequences that set something
    got = wire.step_from_pb(req, D, torch.float32, 1024, G)
    assert got.src == "node-a" and torch.equal(got.hidden, msg.hidden)
    for a, b in zip(msg.seqs, got.seqs):
        assert (a.seq_id, a.pos, a.count, a.want, a.fill_only, a.policy, a.sampling) == \
               (b.seq_id, b.pos, b.count, b.want, b.fill_only, b.policy, b.sampling), a.seq_id
        assert b.deadline_ms == a.deadline_ms or (math.isinf(a.deadline_ms) and b.deadline_ms == INF)
        if a.verify is None:
            assert b.verify is None
        else:
            assert b.verify.drafts == a.verify.drafts
            assert (b.verify.draft_p is None) == (a.verify.draft_p is None)
            if a.verify.draft_p is not None:
                assert torch.allclose(b.verify.draft_p, a.verify.draft_p)


def test_older_peers_per_sequence_messages_still_read():
    req = pb.StepRequest(seqs=[pb.SeqStep(seq_id="old", pos=4, count=2, max_exit=1, deadline_ms=10.0)],
                         hidden=wire.codec.encode(torch.randn(1, 2, D)))
    got = wire.step_from_pb(_through_bytes(req), D, torch.float32, 1024, G)
    s = got.seqs[0]
    assert (s.seq_id, s.pos, s.count, s.want, s.deadline_ms, s.verify) == ("old", 4, 2, 1, 10.0, None)


def test_older_peers_per_sequence_results_still_read():
    m = pb.StepReply(tier="cloud", results=[pb.SeqResult(
        token=5, exit=3, tier="cloud", confidence=[pb.ExitConfidence(exit=3, max_prob=0.5, entropy=1.0, margin=0.25)],
        tiers=[pb.TierTiming(tier="cloud", compute_ms=1.5)], hops=[pb.HopTiming(src="edge", dst="cloud", net_ms=0.5)],
        length=9, total_ms=2.0, error_code="FAILED_PRECONDITION", error="resend")])
    r = wire.reply_from_pb(_through_bytes(m), 1).results[0]
    assert (r.token, r.exit, r.tier, r.length, r.error) == (5, 3, "cloud", 9, ("FAILED_PRECONDITION", "resend"))
    assert r.confidence == [(3, 0.5, 1.0, 0.25)] and r.timings == {"cloud": 1.5, "net:edge->cloud": 0.5}
    with pytest.raises(CodecError, match="1 results for 2 sequences"):
        wire.reply_from_pb(m, 2)


def test_reply_round_trips_every_field_as_columns():
    res = [Result(7, 3, "cloud", confidence=[(0, 0.5, 1.2, 0.1), (3, 0.9, 0.3, 0.8)],
                  timings={"cloud": 1.5, "edge": 0.7, "net:edge->cloud": 0.2}, length=11, total_ms=2.5),
           Result(-1, -1, "edge", degraded=True, reason="next tier cloud: UNAVAILABLE", length=4),
           Result(error=("FAILED_PRECONDITION", "lost it"), tier="cloud", length=2),
           Result(12, 1, "cloud", timings={"cloud": 0.9}, length=6, drafted=3, accepted=2)]
    m = _through_bytes(wire.reply_to_pb(StepReply(res, "edge")))
    assert m.HasField("cols") and not m.results
    assert sorted(m.cols.names) == ["cloud", "edge", "net:edge->cloud"]  # each name once
    got = wire.reply_from_pb(m, 4)
    assert got.tier == "edge"
    for a, b in zip(res, got.results):
        assert (a.token, a.exit, a.tier, a.degraded, a.reason, a.error, a.length, a.drafted, a.accepted) == \
               (b.token, b.exit, b.tier, b.degraded, b.reason, b.error, b.length, b.drafted, b.accepted)
        assert b.total_ms == pytest.approx(a.total_ms)
        assert b.timings == pytest.approx(a.timings)
        assert [(e, pytest.approx(p), pytest.approx(h), pytest.approx(g)) for e, p, h, g in a.confidence] == b.confidence
    assert [r.ok for r in got.results] == [r.ok for r in res]


def test_malformed_columns_fail_with_a_message():
    good = wire.step_to_pb(_message(), "float32")

    def bad(edit, needle):
        req = pb.StepRequest()
        req.CopyFrom(good)
        edit(req.cols)
        with pytest.raises(CodecError, match=needle):
            wire.step_from_pb(_through_bytes(req), D, torch.float32, 1024, G)

    bad(lambda c: c.pos.append(1), "one entry per sequence")
    bad(lambda c: c.count.__setitem__(0, 0), "'plain': pos must be >= 0 and count >= 1")
    bad(lambda c: c.max_exit.__setitem__(1, G), "'fill': exit 4 out of range")
    bad(lambda c: c.deadline_ms.__setitem__(0, float("nan")), "deadline_ms must be finite")
    bad(lambda c: c.seq_id.__setitem__(2, ""), "seq_id must be 1..256")
    bad(lambda c: c.extras.add(index=9), "extra for sequence 9 of 5")
    bad(lambda c: c.count.__setitem__(0, 2), "sequences bring 14 rows but the hidden states have 13")
    rep = wire.reply_to_pb(StepReply([Result(1, 0, "edge", timings={"edge": 1.0})], "edge"))
    with pytest.raises(CodecError, match="must hold 2 entries"):
        wire.reply_from_pb(_through_bytes(rep), 2)
    rep.cols.timing_key[0] = 5
    with pytest.raises(CodecError, match="inconsistent"):
        wire.reply_from_pb(_through_bytes(rep), 1)
