"""Wire options on a real chain: pending positions chunked under a small message limit (fill_only),
lossy wire dtypes, a head rewind (retrying a step), and FamilyInfo's view of the chain."""
import pytest

from relay.client import RelayClient
from tests.relay.relay_helpers import chain, run


def test_pending_positions_chunked_under_small_message_limit_stay_exact(family):
    cfg = family.model.cfg
    per_pos = 4 * cfg.d_model
    small = {"max_message_bytes": (64 << 10) + 5 * per_pos}  # 5 positions per hidden-state message

    async def go():
        async with chain(family, device_kw=small, edge_kw=small) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            sid = await c.open_session()
            toks = [(7 * i) % cfg.vocab_size for i in range(23)]
            new, pos = list(toks), 0
            for step in range(6):  # shallow: 23 + 5 positions pile up as pending on the device
                r = await c.forward(sid, new, pos, exit=0)
                pos += len(new)
                toks.append(r.token)
                new = [r.token]
            served_before = (await RelayClient(f"127.0.0.1:{hs[1].port}").stats())["served"]
            r = await c.forward(sid, new, pos, exit=cfg.G - 1)
            assert r.tier == "cloud" and not r.degraded
            assert r.token == family.ref_token(toks, cfg.G - 1)
            edge = await RelayClient(f"127.0.0.1:{hs[1].port}").stats()
            assert edge["served"] - served_before == 6  # ceil(29 / 5) messages, 5 of them fill_only
            await c.close()
    run(go())


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "int8"])
def test_lossy_wire_dtypes_serve(family, wire):
    cfg = family.model.cfg

    async def go():
        kw = {"wire_dtype": wire}
        async with chain(family, device_kw=kw, edge_kw=kw) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            info = await c.family_info()
            assert [t["wire_dtype"] for t in info["tiers"][:2]] == [wire, wire]
            sid = await c.open_session()
            toks, new, pos, same = [1, 2, 3], [1, 2, 3], 0, 0
            for step in range(16):
                r = await c.forward(sid, new, pos, exit=cfg.G - 1)
                assert not r.degraded and r.tier == "cloud"
                same += r.token == family.ref_token(toks, cfg.G - 1)
                pos += len(new)
                toks.append(r.token)
                new = [r.token]
            await c.close()
            return same
    same = run(go())
    assert same >= 8, f"{wire}: only {same}/16 tokens match the exact run"


def test_head_rewind_recomputes_a_step(family):
    cfg = family.model.cfg

    async def go():
        async with chain(family) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            sid = await c.open_session()
            r1 = await c.forward(sid, [5, 6, 7], 0, exit=cfg.G - 1)
            r2 = await c.forward(sid, [r1.token], 3, exit=cfg.G - 1)
            again = await c.forward(sid, [r1.token], 3, exit=cfg.G - 1)  # retry of the same step
            assert again.token == r2.token
            other = await c.forward(sid, [9, 9], 2, exit=1)  # rewrite from position 2
            assert other.token == family.ref_token([5, 6, 9, 9], 1)
            deep = await c.forward(sid, [other.token], 4, exit=cfg.G - 1)
            assert deep.token == family.ref_token([5, 6, 9, 9, other.token], cfg.G - 1)
            await c.close()
    run(go())


def test_family_info_lists_the_chain(family):
    async def go():
        async with chain(family) as hs:
            c = RelayClient(f"127.0.0.1:{hs[0].port}")
            info = await c.family_info()
            await c.close()
            return info, [h.port for h in hs]
    info, ports = run(go())
    cfg = family.model.cfg
    assert info["complete"] and info["n_exits"] == cfg.G
    assert [t["tier"] for t in info["tiers"]] == ["device", "edge", "cloud"]
    assert [t["address"] for t in info["tiers"]] == ["", f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}"]
    exits = [e for t in info["tiers"] for e in t["exits"]]
    assert [e["index"] for e in exits] == list(range(cfg.G))
    assert [e["layer"] for e in exits] == list(cfg.exits)
    if family.name == "tiny-random":
        assert [e["val_loss"] for e in exits] == pytest.approx([3.1, 2.7, 2.4])
