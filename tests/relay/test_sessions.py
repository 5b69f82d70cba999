"""Session limits and eviction on real nodes: max sessions (LRU), tokens per session, total bytes,
idle timeout; close propagates down the chain; a deeper tier that evicted a session gets it back by
replay from position 0 and stays exact."""
import asyncio

import pytest

from relay.client import RelayClient, RelayError
from relay.session import Limits
from tests.relay.conftest import chain, run


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
                assert s["sessions"][sid]["kv_bytes"] > 0
            assert st[0]["sessions"][sid]["log_bytes"] > 0 and st[2]["sessions"][sid]["log_bytes"] == 0
            assert st[0]["sessions"][sid]["acked"] == 10
            assert await c.close_session(sid)
            assert not await c.close_session(sid)
            st = [await RelayClient(f"127.0.0.1:{h.port}").stats() for h in hs]
            assert [s["live_sessions"] for s in st] == [0, 0, 0]
            with pytest.raises(RelayError) as e:
                await c.forward(sid, [1], 10)
            assert e.value.code == "NOT_FOUND"
            await c.close()
    run(go())


def test_lru_eviction_tokens_limit_and_idle_timeout(family):
    async def go():
        limits = Limits(max_sessions=2, max_tokens=16, idle_timeout_s=0.3)
        async with chain(family, device_kw={"limits": limits}) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            a, b = await c.open_session("a"), await c.open_session("b")
            await c.forward(a, [1, 2], 0, exit=0)   # a is now the most recently used
            await c.open_session("c")              # evicts b (least recently used)
            st = await c.stats()
            assert set(st["sessions"]) == {"a", "c"} and st["evicted"] == 1
            with pytest.raises(RelayError) as e:
                await c.forward(a, list(range(15)), 2, exit=0)
            assert e.value.code == "RESOURCE_EXHAUSTED"
            with pytest.raises(RelayError) as e:
                await c.open_session("a")
            assert e.value.code == "ALREADY_EXISTS"
            await asyncio.sleep(1.0)
            assert (await c.stats())["live_sessions"] == 0, "idle sessions must be closed"
            await c.close()
    run(go())


def test_total_bytes_limit_evicts_other_sessions(family):
    async def go():
        async with chain(family) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            s1 = await c.open_session()
            await c.forward(s1, list(range(40)), 0, exit=0)
            one = (await c.stats())["total_bytes"]
            hs[0].node.sessions.limits.max_total_bytes = int(one * 1.5)
            s2 = await c.open_session()
            await c.forward(s2, list(range(40)), 0, exit=0)
            st = await c.stats()
            assert set(st["sessions"]) == {s2} and st["evicted"] == 1
            hs[0].node.sessions.limits.max_total_bytes = one // 4
            with pytest.raises(RelayError) as e:
                await c.forward(s2, [1], 40, exit=0)
            assert e.value.code == "RESOURCE_EXHAUSTED"
            await c.close()
    run(go())


def test_deeper_tier_evicts_session_and_gets_it_back_by_replay(family):
    G = family.model.cfg.G

    async def go():
        async with chain(family, cloud_kw={"limits": Limits(max_sessions=1)}) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            s1, s2 = await c.open_session(), await c.open_session()
            t1, t2 = [7, 8, 9], [10, 11]
            r = await c.forward(s1, t1, 0, exit=G - 1)
            t1.append(r.token)
            r = await c.forward(s2, t2, 0, exit=G - 1)  # the cloud evicts s1
            t2.append(r.token)
            cloud = RelayClient(f"127.0.0.1:{hs[2].port}")
            assert set((await cloud.stats())["sessions"]) == {s2}
            for _ in range(3):
                r = await c.forward(s1, t1[-1:], len(t1) - 1, exit=G - 1)  # NOT_FOUND there -> reopen + replay
                assert r.tier == "cloud" and not r.degraded
                assert r.token == family.ref_token(t1, G - 1)
                t1.append(r.token)
            assert (await cloud.stats())["sessions"][s1]["length"] == len(t1) - 1
            await cloud.close()
            await c.close()
    run(go())
