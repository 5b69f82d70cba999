"""Sessions on real nodes: close propagates down the chain; the KV pool bounds memory (slots, LRU
eviction of idle sequences, positions per sequence), sequences tracked and idle timeout; a deeper tier
that evicted a sequence gets it back by replay and stays exact; sessions belong to whoever opened them."""
import asyncio

import pytest

from relay.client import RelayClient, RelayError
from relay.tier import TierConfig
from tests.relay.relay_helpers import chain, run


def test_close_propagates_and_stats_report_kv_bytes(family):
    G = family.model.cfg.G

    async def go():
        async with chain(family) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            sid = await c.open_session()
            await c.forward(sid, list(range(10)), 0, exit=G - 1)
            st = [await RelayClient(f"127.0.0.1:{h.port}").stats() for h in hs]
            for s in st:
                assert s["live_sessions"] == 1 and s["sessions"][sid]["length"] == 10
                assert s["sessions"][sid]["kv_bytes"] > 0 and s["pool"]["slots"] > 0
            assert st[0]["sessions"][sid]["acked"] == 10 and st[1]["sessions"][sid]["acked"] == 10
            assert await c.close_session(sid)
            assert not await c.close_session(sid)
            await asyncio.sleep(0.2)  # releases travel down the chain
            st = [await RelayClient(f"127.0.0.1:{h.port}").stats() for h in hs]
            assert [s["live_sessions"] for s in st] == [0, 0, 0]
            assert [s["pool"]["free_slots"] for s in st] == [s["pool"]["slots"] for s in st]
            with pytest.raises(RelayError) as e:
                await c.forward(sid, [1], 10)
            assert e.value.code == "NOT_FOUND"
            await c.close()
    run(go())


def test_pool_slots_sessions_tokens_and_idle_timeout(family):
    async def go():
        kw = {"max_slots": 2, "engine": TierConfig(max_sessions=3, idle_timeout_s=0.3)}
        async with chain(family, device_kw=kw) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            a, b = await c.open_session("a"), await c.open_session("b", max_tokens=16)
            await c.forward(a, [1, 2], 0, exit=0)
            await c.forward(b, [3, 4], 0, exit=0)
            x = await c.open_session("x")
            await c.forward(x, [5, 6], 0, exit=0)          # no free slot: a (least recently used) is evicted
            st = await c.stats()
            assert st["evicted"] == 1 and st["pool"]["free_slots"] == 0
            with pytest.raises(RelayError) as e:            # a lost its KV here; its client must start over
                await c.forward(a, [7], 2, exit=0)
            assert e.value.code == "FAILED_PRECONDITION" and "resend from 0" in e.value.details
            with pytest.raises(RelayError) as e:
                await c.forward(b, list(range(15)), 2, exit=0)
            assert e.value.code == "RESOURCE_EXHAUSTED"
            with pytest.raises(RelayError) as e:
                await c.open_session("b")
            assert e.value.code == "ALREADY_EXISTS"
            await c.open_session("y")                       # a 4th tracked sequence: the idle LRU one goes
            assert (await c.stats())["live_sessions"] == 3
            await asyncio.sleep(1.2)
            assert (await c.stats())["live_sessions"] == 0, "idle sessions must be closed"
            await c.close()
    run(go())


def test_deeper_tier_evicts_session_and_gets_it_back_by_replay(family):
    G = family.model.cfg.G

    async def go():
        async with chain(family, cloud_kw={"max_slots": 1}) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            s1, s2 = await c.open_session(), await c.open_session()
            t1, t2 = [7, 8, 9], [10, 11]
            r = await c.forward(s1, t1, 0, exit=G - 1)
            t1.append(r.token)
            r = await c.forward(s2, t2, 0, exit=G - 1)  # the cloud evicts s1's KV
            t2.append(r.token)
            cloud = RelayClient(f"127.0.0.1:{hs[2].port}")
            assert (await cloud.stats())["evicted"] == 1
            for _ in range(3):
                r = await c.forward(s1, t1[-1:], len(t1) - 1, exit=G - 1)  # refused there -> replay from 0
                assert r.tier == "cloud" and not r.degraded
                assert r.token == family.ref_token(t1, G - 1)
                t1.append(r.token)
            assert (await cloud.stats())["sessions"][s1]["length"] == len(t1) - 1
            await cloud.close()
            await c.close()
    run(go())


def test_sessions_belong_to_their_opener_and_ids_stay_private(family):
    async def go():
        kw = {"admin_token": "adm1n"}
        async with chain(family, device_kw=kw) as hs:
            addr = f"127.0.0.1:{hs[0].port}"
            alice, mallory, admin = RelayClient(addr), RelayClient(addr), RelayClient(addr, admin_token="adm1n")
            sid = await alice.open_session()
            await alice.forward(sid, [1, 2, 3], 0, exit=0)
            st = await mallory.stats()
            assert st["live_sessions"] == 1 and st["sessions"] == {}        # counts, but no ids
            assert sid in (await admin.stats())["sessions"]
            mallory.capabilities[sid] = "guess"
            for call in (mallory.forward(sid, [4], 3, exit=0), mallory.close_session(sid)):
                with pytest.raises(RelayError) as e:
                    await call
                assert e.value.code == "PERMISSION_DENIED"
            r = await alice.forward(sid, [4], 3, exit=0)                   # still alice's, intact
            assert r.token == family.ref_token([1, 2, 3, 4], 0)
            for cl in (alice, mallory, admin):
                await cl.close()
    run(go())
