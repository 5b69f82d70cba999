"""Malformed input never crashes a node: >= 200 generated bad requests each get a clear error status
(INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED / FAILED_PRECONDITION / ALREADY_EXISTS, with a
message; bytes that are not a protobuf at all are INVALID_ARGUMENT too), and the chain still serves exact tokens afterwards."""
import math
import random

import grpc
import numpy as np

from relay.client import RelayClient
from relay.pb import pb, pb_grpc
from tests.relay.relay_helpers import chain, run

MAX_MSG = 1 << 20
S = grpc.StatusCode


def _hidden(rng, D, T=2, dtype=pb.FLOAT32, shape=None, nbytes=None, scales=b""):
    size = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.INT8: 1}.get(dtype, 4)
    shape = shape or [1, T, D]
    n = nbytes if nbytes is not None else int(np.prod(shape)) * size
    return pb.Tensor(dtype=dtype, shape=shape, data=rng.randbytes(n) if dtype != pb.FLOAT32 else
                     np.zeros(n // 4, "<f4").tobytes() + b"\0" * (n % 4), scales=scales)


def head_cases(rng, sid, length, cfg):
    """(request-maker name, request, expected codes) for the head (token-id) node."""
    V, G = cfg.vocab_size, cfg.G
    ok = lambda **kw: pb.ForwardRequest(session_id=sid, pos=length, tokens=pb.TokenIds(ids=[1]), **kw)
    pick = rng.randrange(14)
    if pick == 0:
        return pb.ForwardRequest(pos=0, tokens=pb.TokenIds(ids=[1])), {S.INVALID_ARGUMENT}
    if pick == 1:
        return pb.ForwardRequest(session_id=f"nope-{rng.random()}", pos=0, tokens=pb.TokenIds(ids=[1])), {S.NOT_FOUND}
    if pick == 2:
        return pb.ForwardRequest(session_id=sid, pos=-rng.randint(1, 10**9), tokens=pb.TokenIds(ids=[1])), {S.INVALID_ARGUMENT}
    if pick == 3:
        return pb.ForwardRequest(session_id=sid, pos=length + rng.randint(1, 50), tokens=pb.TokenIds(ids=[1])), {S.FAILED_PRECONDITION}
    if pick == 4:
        return pb.ForwardRequest(session_id=sid, pos=length), {S.INVALID_ARGUMENT}
    if pick == 5:
        return pb.ForwardRequest(session_id=sid, pos=length, tokens=pb.TokenIds(ids=[])), {S.INVALID_ARGUMENT}
    if pick == 6:
        bad = rng.choice([-1, -rng.randint(2, 10**6), V, V + rng.randint(1, 10**9)])
        return pb.ForwardRequest(session_id=sid, pos=length, tokens=pb.TokenIds(ids=[1, bad])), {S.INVALID_ARGUMENT}
    if pick == 7:
        return pb.ForwardRequest(session_id=sid, pos=length, hidden=_hidden(rng, cfg.d_model)), {S.INVALID_ARGUMENT}
    if pick == 8:
        r = ok()
        r.max_exit = rng.choice([-1, G, G + rng.randint(1, 100), -rng.randint(2, 100)])
        return r, {S.INVALID_ARGUMENT}
    if pick == 9:
        return ok(policy=pb.ExitPolicy(kind=rng.randint(4, 100))), {S.INVALID_ARGUMENT}
    if pick == 10:
        kind = rng.choice([pb.ExitPolicy.MAX_PROB, pb.ExitPolicy.MARGIN, pb.ExitPolicy.ENTROPY])
        thr = rng.choice([math.nan, math.inf, -math.inf, -0.5] + ([1.5, 7.0] if kind != pb.ExitPolicy.ENTROPY else []))
        return ok(policy=pb.ExitPolicy(kind=kind, threshold=thr)), {S.INVALID_ARGUMENT}
    if pick == 11:
        samp = rng.choice([pb.Sampling(temperature=-1.0), pb.Sampling(temperature=math.nan), pb.Sampling(temperature=1e9),
                           pb.Sampling(top_p=1.5), pb.Sampling(top_p=-0.1), pb.Sampling(top_p=math.nan)])
        return ok(sampling=samp), {S.INVALID_ARGUMENT}
    if pick == 12:  # more positions than a session may hold
        return pb.ForwardRequest(session_id=sid, pos=length, tokens=pb.TokenIds(ids=[1] * (cfg.max_seq_len + rng.randint(1, 40)))), \
            {S.RESOURCE_EXHAUSTED}
    # over the message size limit
    return pb.ForwardRequest(session_id=sid, pos=length, tokens=pb.TokenIds(ids=[1] * (MAX_MSG // 2 + 1000))), {S.RESOURCE_EXHAUSTED}


def edge_cases(rng, sid, length, cfg):
    """Hidden-state requests to the edge node."""
    D = cfg.d_model
    pick = rng.randrange(12)
    base = dict(session_id=sid, pos=length)
    if pick == 0:
        t = _hidden(rng, D, dtype=rng.choice([0, 5, 17]))
    elif pick == 1:
        t = _hidden(rng, D, shape=rng.choice([[2, D], [1, 1, 1, D], [D], []]))
    elif pick == 2:
        t = _hidden(rng, D, shape=[rng.randint(2, 4), 2, D])
    elif pick == 3:
        t = _hidden(rng, D, shape=[1, 2, D + rng.choice([-1, 1, 7])])
    elif pick == 4:
        t = _hidden(rng, D, nbytes=8 * D + rng.choice([-3, -1, 1, 5]))
    elif pick == 5:
        t = _hidden(rng, D, dtype=pb.INT8, scales=rng.choice([b"", b"\0\0\0\0", b"\0" * 13]))
    elif pick == 6:
        t = _hidden(rng, D, scales=b"\0" * 8)
    elif pick == 7:
        t = pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1, D], data=np.full(D, rng.choice([np.nan, np.inf]), "<f4").tobytes())
    elif pick == 8:
        return pb.ForwardRequest(tokens=pb.TokenIds(ids=[1]), **base), {S.INVALID_ARGUMENT}
    elif pick == 9:
        t = _hidden(rng, D, shape=[1, 0, D])
    elif pick == 10:
        return pb.ForwardRequest(session_id=sid, pos=length + rng.randint(1, 9), hidden=_hidden(rng, D)), {S.FAILED_PRECONDITION}
    else:
        return pb.ForwardRequest(session_id=sid, pos=length, hidden=_hidden(rng, D, T=MAX_MSG // (4 * D) + 5)), {S.RESOURCE_EXHAUSTED}
    return pb.ForwardRequest(hidden=t, **base), {S.INVALID_ARGUMENT}


def session_cases(rng, sid):
    pick = rng.randrange(3)
    if pick == 0:
        return "OpenSession", pb.OpenSessionRequest(session_id="x" * rng.randint(257, 2000)), {S.INVALID_ARGUMENT}
    if pick == 1:
        return "OpenSession", pb.OpenSessionRequest(max_tokens=-rng.randint(1, 10**6)), {S.INVALID_ARGUMENT}
    return "OpenSession", pb.OpenSessionRequest(session_id=sid), {S.ALREADY_EXISTS}


def test_two_hundred_malformed_requests_then_still_serves(family):
    cfg = family.model.cfg
    kw = {"max_message_bytes": MAX_MSG}

    async def go():
        rng = random.Random(3)
        async with chain(family, device_kw=kw, edge_kw=kw, cloud_kw=kw) as (dev, edge, cloud):
            c = RelayClient(f"127.0.0.1:{dev.port}")
            sid = await c.open_session()
            prompt = [4, 5, 6]
            r0 = await c.forward(sid, prompt, 0, exit=0)  # the edge has not seen these yet
            ch_dev, ch_edge = grpc.aio.insecure_channel(f"127.0.0.1:{dev.port}"), grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}")
            stubs = {"dev": pb_grpc.RelayStub(ch_dev), "edge": pb_grpc.RelayStub(ch_edge)}
            opened = await stubs["edge"].OpenSession(pb.OpenSessionRequest(session_id="e1"))
            caps = {sid: c.capabilities[sid], "e1": opened.capability}  # the sessions' owner sends junk
            garbage = ch_dev.unary_unary("/familial.relay.v1.Relay/Forward", request_serializer=None,
                                         response_deserializer=None)
            seen, failures = {}, []
            for i in range(240):
                kind = rng.choice(["dev"] * 5 + ["edge"] * 4 + ["open", "garbage"])
                if kind == "dev":
                    method, (req, want) = stubs["dev"].Forward, head_cases(rng, sid, 3, cfg)
                elif kind == "edge":
                    method, (req, want) = stubs["edge"].Forward, edge_cases(rng, "e1", 0, cfg)
                elif kind == "open":
                    name, req, want = session_cases(rng, sid)
                    method = stubs["dev"].OpenSession
                else:
                    method, req, want = garbage, b"\xff\xff\xff" + rng.randbytes(rng.randint(0, 64)), {S.INVALID_ARGUMENT}
                if isinstance(req, pb.ForwardRequest):
                    req.capability = caps.get(req.session_id, "")
                try:
                    await method(req, timeout=10)
                    failures.append((i, kind, "no error", req if not isinstance(req, bytes) else req[:8]))
                except grpc.aio.AioRpcError as e:
                    seen[e.code()] = seen.get(e.code(), 0) + 1
                    if e.code() not in want or not e.details():
                        failures.append((i, kind, e.code(), e.details()))
            # still serving, and exactly: next token at the deepest exit (the edge and cloud catch up)
            r = await c.forward(sid, [r0.token], 3, exit=cfg.G - 1)
            assert not r.degraded and r.tier == "cloud"
            assert r.token == family.ref_token(prompt + [r0.token], cfg.G - 1)
            await c.close()
            await ch_dev.close()
            await ch_edge.close()
            return seen, failures
    seen, failures = run(go())
    assert not failures, failures[:5]
    assert sum(seen.values()) >= 200
    assert {S.INVALID_ARGUMENT, S.NOT_FOUND, S.RESOURCE_EXHAUSTED, S.FAILED_PRECONDITION} <= set(seen)
