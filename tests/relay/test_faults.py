"""Faults: a deeper tier stops, is too slow for the deadline, or restarts without its sessions.

The node above answers from its own deepest exit with degraded=true (exact for that exit), never
hangs past the deadline, and keeps the session usable; once the tier is back, the next deep request
replays the positions it missed (from position 0 when it lost the session) and exactness holds again.
"""
import asyncio
import time

from relay.cli import start_node
from relay.client import RelayClient
from relay.tier import TierConfig
from tests.relay.relay_helpers import chain, run, stage

DEADLINE_S = 2.0


class Gen:
    """Greedy generation through the head, checking every token against the reference run."""

    def __init__(self, client, fam, sid, prompt):
        self.c, self.fam, self.sid = client, fam, sid
        self.toks, self.new, self.pos = list(prompt), list(prompt), 0

    async def step(self, exit, deadline_s=DEADLINE_S):
        t = time.perf_counter()
        r = await self.c.forward(self.sid, self.new, self.pos, exit=exit, deadline_s=deadline_s)
        wall = time.perf_counter() - t
        assert r.token == self.fam.ref_token(self.toks, r.exit), (len(self.toks), r)
        self.pos += len(self.new)
        self.toks.append(r.token)
        self.new = [r.token]
        return r, wall


def test_cloud_stops_and_restarts_mid_generation(family):
    G = family.model.cfg.G

    async def go():
        async with chain(family) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            g = Gen(c, family, await c.open_session(), [5, 6, 7, 8])
            for _ in range(6):
                r, _ = await g.step(G - 1)
                assert r.tier == "cloud" and not r.degraded
            port = hs[2].port
            await hs[2].stop()  # cloud goes away mid-generation
            for _ in range(6):
                r, wall = await g.step(G - 1)
                assert r.degraded and r.tier == "edge" and r.exit == 1 and "UNAVAILABLE" in r.reason, r
                assert wall < DEADLINE_S
            for _ in range(3):  # shallow steps while it is down: pending positions pile up at the edge
                r, _ = await g.step(0)
                assert r.tier == "device" and not r.degraded
            hs[2] = await start_node(stage=stage(family, "cloud"), port=port)  # back, with no sessions
            t0, back = time.monotonic(), 0
            while back < 8:
                r, wall = await g.step(G - 1)
                assert wall < DEADLINE_S
                if r.degraded:  # the edge's channel may still be in reconnect backoff (<= 1 s)
                    assert back == 0 and time.monotonic() - t0 < 3.0, r
                    await asyncio.sleep(0.1)
                    continue
                assert r.tier == "cloud", r
                back += 1
            cloud_len = (await RelayClient(f"127.0.0.1:{hs[2].port}").stats())["sessions"][g.sid]["length"]
            assert cloud_len == g.pos, "the restarted cloud must hold every position (replayed from 0)"
            await c.close()
    run(go())


def test_slow_cloud_misses_deadline_then_catches_up(family):
    G = family.model.cfg.G

    async def go():
        # margins wide enough for a loaded 2-core CI box; what is checked is "no hang past the deadline"
        margin = {"engine": TierConfig(deadline_margin_ms=60)}
        async with chain(family, device_kw=margin, edge_kw=margin, cloud_kw={"inject_delay_ms": 800}) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            g = Gen(c, family, await c.open_session(), [1, 2, 3])
            for _ in range(3):
                r, wall = await g.step(G - 1, deadline_s=0.4)  # a reply, not DEADLINE_EXCEEDED
                assert r.degraded and r.exit == 1 and "DEADLINE_EXCEEDED" in r.reason, r
                assert wall < 0.4 + 0.05, wall
            hs[2].node.engine.conf.step_delay_ms = 0
            await asyncio.sleep(1.1)  # the edge leaves a failed cloud alone for down_cooldown_s (1 s)
            for _ in range(4):
                r, _ = await g.step(G - 1, deadline_s=5.0)
                assert r.tier == "cloud" and not r.degraded, r
            timings = r.timings
            assert {"device", "edge", "cloud", "net:device->edge", "net:edge->cloud"} <= set(timings), timings
            await c.close()
    run(go())


def test_no_deeper_tier_at_all_degrades_at_the_head(family):
    G = family.model.cfg.G

    async def go():
        async with chain(family) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            g = Gen(c, family, await c.open_session(), [9, 9])
            await hs[1].stop()
            await hs[2].stop()
            r, wall = await g.step(G - 1, deadline_s=1.0)
            assert r.degraded and r.tier == "device" and r.exit == 0 and wall < 1.0
            r, _ = await g.step(0)
            assert not r.degraded
            info = await c.family_info()
            assert not info["complete"] and [t["tier"] for t in info["tiers"]] == ["device"]
            await c.close()
    run(go())


def test_hop_times_exclude_the_senders_encoding(family, monkeypatch):
    """Encoding a step waits for its kernels and copies the hidden states to the host: the tier's own
    work. The real encoder behind a 100 ms sleep must show in that tier's time, not the hop's."""
    from relay import wire

    real = wire.step_to_pb

    def slow_step_to_pb(*a, **k):
        time.sleep(0.1)
        return real(*a, **k)

    monkeypatch.setattr(wire, "step_to_pb", slow_step_to_pb)
    G = family.model.cfg.G

    async def go():
        async with chain(family) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            g = Gen(c, family, await c.open_session(), [1, 2, 3])
            for _ in range(3):
                r, _ = await g.step(G - 1, deadline_s=5.0)
                t = r.timings
                assert r.tier == "cloud" and not r.degraded, r
                assert t["device"] >= 100 and t["edge"] >= 100, t  # each encoded one step for the next tier
                assert t["net:device->edge"] < 100 and t["net:edge->cloud"] < 100, t
            await c.close()
    run(go())
