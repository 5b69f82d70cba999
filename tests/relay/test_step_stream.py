"""StepStream: tier-to-tier steps over one long-lived gRPC stream per tier pair (relay/node.py).

A failed step is answered on the stream with the status a unary Step would end with (and the stream
stays open for the next); the node token is required as for Step; chains that hop over the stream and
over unary calls give the same, exact tokens; a hop that breaks (the next tier stopped) degrades the
answer and a restarted tier is reached over a new stream."""
import asyncio

import grpc
import numpy as np

from relay.cli import start_node
from relay.client import RelayClient
from relay.pb import pb, pb_grpc
from tests.relay.relay_helpers import chain, run, stage


def _req(call_id: int, D: int, count: int = 2, width: int | None = None, rows: int | None = None) -> pb.StepRequest:
    width, rows = width or D, rows or count
    hidden = pb.Tensor(dtype=pb.FLOAT32, shape=[1, rows, width], data=np.zeros(rows * width, "<f4").tobytes())
    return pb.StepRequest(seqs=[pb.SeqStep(seq_id=f"s{call_id}", pos=0, count=count)], hidden=hidden,
                          src="test", call_id=call_id)


def test_failed_steps_are_answered_on_the_stream_which_stays_open(family):
    cfg = family.model.cfg

    async def go():
        async with chain(family) as (dev, edge, cloud):
            out = []
            async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as ch:
                call = pb_grpc.RelayStub(ch).StepStream()
                await call.write(_req(11, cfg.d_model, width=cfg.d_model + 1))   # wrong width
                out.append(await call.read())
                await call.write(_req(12, cfg.d_model, count=3, rows=2))         # rows != positions
                out.append(await call.read())
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
            async with grpc.aio.insecure_channel(f"127.0.0.1:{dev.port}") as ch:  # the head takes token ids
                call = pb_grpc.RelayStub(ch).StepStream()
                await call.write(_req(13, cfg.d_model))
                out.append(await call.read())
                await call.done_writing()
            # and the chain still answers exactly at the deepest exit
            c = RelayClient(f"127.0.0.1:{dev.port}")
            sid = await c.open_session()
            r = await c.forward(sid, [4, 5, 6], 0, exit=cfg.G - 1)
            await c.close()
            return out, r
    (a, b, h), r = run(go())
    assert (a.call_id, a.error_code) == (11, "INVALID_ARGUMENT") and "[edge]" in a.error and not a.results
    assert (b.call_id, b.error_code) == (12, "INVALID_ARGUMENT") and b.error
    assert (h.call_id, h.error_code) == (13, "FAILED_PRECONDITION") and "token ids" in h.error
    assert not r.degraded and r.token == family.ref_token([4, 5, 6], cfg.G - 1)


def test_stream_needs_the_node_token(family):
    async def go():
        cloud = await start_node(stage=stage(family, "cloud"), node_token="secret-node-token")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cloud.port}") as ch:
                call = pb_grpc.RelayStub(ch).StepStream()
                await call.write(_req(1, family.model.cfg.d_model))
                try:
                    await call.read()
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details()
                return None, "answered"
        finally:
            await cloud.stop()
    code, details = run(go())
    assert code == grpc.StatusCode.PERMISSION_DENIED and "node token" in details


def test_stream_and_unary_hops_give_the_same_exact_tokens(family):
    cfg = family.model.cfg
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]

    async def gen(kw):
        async with chain(family, device_kw=kw, edge_kw=kw) as (dev, _, _):
            c = RelayClient(f"127.0.0.1:{dev.port}")
            outs = []
            for p in prompts:
                sid = await c.open_session()
                toks, new, pos = list(p), list(p), 0
                for _ in range(6):
                    r = await c.forward(sid, new, pos, exit=cfg.G - 1)
                    assert not r.degraded and r.tier == "cloud", r.reason
                    pos += len(new)
                    toks.append(r.token)
                    new = [r.token]
                outs.append(toks)
                await c.close_session(sid)
            await c.close()
            return outs

    stream, unary = run(gen({})), run(gen({"step_stream": False}))
    assert stream == unary
    for toks, p in zip(stream, prompts):
        for i in range(len(p), len(toks)):
            assert toks[i] == family.ref_token(toks[:i], cfg.G - 1)


def test_a_broken_stream_degrades_then_a_restarted_tier_is_reached_again(family):
    """The cloud stops: the edge's stream breaks, the step answers from the edge (degraded); a new
    cloud on the same port is reached over a fresh stream, exactly."""
    cfg = family.model.cfg

    async def go():
        cloud = await start_node(stage=stage(family, "cloud"))
        port = cloud.port
        edge = await start_node(stage=stage(family, "edge"), next=f"127.0.0.1:{port}")
        dev = await start_node(stage=stage(family, "device"), next=f"127.0.0.1:{edge.port}")
        c = RelayClient(f"127.0.0.1:{dev.port}")
        try:
            prompt = [7, 7, 2]
            sid = await c.open_session()
            first = await c.forward(sid, prompt, 0, exit=cfg.G - 1)
            await cloud.stop()
            down = await c.forward(sid, [first.token], 3, exit=cfg.G - 1)
            cloud = await start_node(stage=stage(family, "cloud"), port=port)
            for _ in range(60):  # the edge's channel reconnects after its back-off (about a second)
                edge.node.engine._down_bad_until = 0.0  # skip the cool-down instead of sleeping through it
                sid2 = await c.open_session()
                again = await c.forward(sid2, prompt, 0, exit=cfg.G - 1)
                await c.close_session(sid2)
                if not again.degraded:
                    break
                await asyncio.sleep(0.1)
            return first, down, again
        finally:
            await c.close()
            for h in (dev, edge, cloud):
                await h.stop()
    first, down, again = run(go())
    assert not first.degraded and first.tier == "cloud"
    assert down.degraded and down.tier in ("device", "edge") and down.exit < cfg.G - 1
    assert not again.degraded and again.tier == "cloud" and again.token == first.token
