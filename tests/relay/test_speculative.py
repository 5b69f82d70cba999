"""Speculative decoding through the tier engine: the head drafts with a shallow exit, the target exit
verifies k drafts in one step (relay/speculative.py, relay/tier.py, trunk.sampling.verify_drafts).

- Greedy: the tokens equal the target exit's own greedy tokens, over random prompts, (draft, target)
  pairs, k, splits of the family into tiers, in process and over three real gRPC nodes.
- After every round each tier's sequence is cut back to the accepted prefix (checked on every engine
  when the round's last token is emitted; over gRPC: no tier ever needs a rewind).
- Sampling: the acceptance rule's output is distributed as the target's (chi-square on a 5-token
  vocabulary), and so is the engine's (joint of three tokens of a model with an 8-token vocabulary).
- A tier killed mid-round: the round is checked against the deepest exit still reachable (degraded)
  and every token equals that exit's greedy token.
"""
from __future__ import annotations

import asyncio
import random

import pytest
import torch
from scipy.stats import chisquare

from relay.client import RelayClient
from relay.tier import LocalDownstream, TierConfig, TierEngine
from relay.work import GenRequest, Speculative
from tests.hop_delay import delay_hop
from tests.relay.relay_helpers import chain as grpc_chain, run
from trunk import FamilyModel, get_preset
from trunk.kv_pool import KVPool
from trunk.sampling import SamplingParams, probs, sample, verify_drafts
from trunk.stage import Stage


def tiny_model(vocab: int | None = None, seed: int = 1234) -> FamilyModel:
    torch.manual_seed(seed)
    cfg = get_preset("tiny").replace(branch_layers=1)
    if vocab is not None:
        cfg = cfg.replace(vocab_size=vocab)
    m = FamilyModel(cfg).eval()
    with torch.no_grad():  # larger weights than the init so the exits disagree and argmax margins are wide
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engines_for(model, split: list[list[int]], slots: int = 16) -> list[TierEngine]:
    engines, down = [], None
    for exits in reversed(split):
        st = Stage(model, exits)
        e = TierEngine(st, KVPool(st.pool_shape(160), slots, "cpu"), f"tier{exits[0]}", down, TierConfig(offload=False))
        engines.insert(0, e)
        down = LocalDownstream(e)
    return engines


def greedy_ref(model, prompt: list[int], g: int, n: int) -> list[int]:
    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            toks.append(int(model(torch.tensor([toks]), exits=[g])[0][0, -1].argmax()))
    return toks[len(prompt):]


async def collect(engine: TierEngine, req: GenRequest, on_event=None) -> list:
    q: asyncio.Queue = asyncio.Queue()

    def emit(ev):
        if on_event is not None:
            on_event(ev)
        q.put_nowait(ev)
    engine.generate(req, emit)
    evs = []
    while not evs or evs[-1].finish_reason is None:
        evs.append(await q.get())
    assert not evs[-1].error, evs[-1].error
    return evs


SPLITS = {"one tier": [[0, 1, 2]], "two tiers": [[0, 1], [2]], "three tiers": [[0], [1], [2]]}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_greedy_equals_target_in_process(model, split):
    """Random prompts, (draft, target) pairs, k and adaptivity, five requests at a time (batched with a
    plain request); every tier holds exactly the accepted prefix whenever a round closes."""
    engines = engines_for(model, split)
    head = engines[0].stage.exits
    rng = random.Random(7)
    V = model.cfg.vocab_size
    totals = {"drafted": 0, "accepted": 0}

    def checker(rid: str, n_prompt: int):
        def on(ev):
            if ev.drafted:
                lens = {e.tier: e.seqs[rid].length for e in engines if rid in e.seqs}
                assert set(lens.values()) == {n_prompt + ev.index}, (ev.index, lens)
        return on

    async def one(i: int):
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 24))]
        draft = rng.choice([g for g in head if g < model.cfg.G - 1])
        target = rng.randrange(draft + 1, model.cfg.G)
        n = rng.randrange(1, 30)
        spec = None if i % 6 == 5 else Speculative(draft, rng.randrange(1, 7), rng.random() < 0.5)
        req = GenRequest(f"r{i}", prompt, n, exit=target, speculative=spec)
        evs = await collect(engines[0], req, checker(req.request_id, len(prompt)))
        assert [e.token for e in evs] == greedy_ref(model, prompt, target, n), (draft, target, spec)
        assert all(e.exit == target and not e.degraded for e in evs)
        totals["drafted"] += sum(e.drafted for e in evs)
        totals["accepted"] += sum(e.accepted for e in evs)

    async def go():
        for e in engines:
            e.start()
        try:
            for b in range(3):
                await asyncio.gather(*(one(6 * b + i) for i in range(6)))
        finally:
            for e in engines:
                await e.stop()
    asyncio.run(go())
    # rejections happened, so truncation after rejection was exercised by the equality above
    assert 0 < totals["accepted"] < totals["drafted"], totals


def test_speculative_requests_are_refused_when_malformed(model):
    from relay.work import EngineError
    from trunk.sampling import ExitPolicy

    engines = engines_for(model, SPLITS["three tiers"])
    for spec, kw in [(Speculative(1), {}), (Speculative(0, k=0), {}),
                     (Speculative(0), {"policy": ExitPolicy("max_prob", 0.5)})]:
        with pytest.raises(EngineError) as e:
            engines[0].generate(GenRequest("x", [1, 2], 4, speculative=spec, **kw), lambda ev: None)
        assert e.value.code == "INVALID_ARGUMENT"


# ---- the sampling rule ---------------------------------------------------------------------------
@pytest.mark.slow
def test_acceptance_rule_output_is_the_target_distribution():
    """Fixed draft and target distributions over 5 tokens (two draft rows + the bonus row): the first
    emitted token follows p_t row 0, and the second (when the first draft was accepted) p_t row 1."""
    g = torch.Generator().manual_seed(3)
    V, N = 5, 20000
    zt, zd = torch.randn(3, V, generator=g) * 1.5, torch.randn(2, V, generator=g) * 1.5
    params = [SamplingParams(1.0, 1.0, s) for s in range(N)]
    p_t, p_d = probs(zt, params[0]), probs(zd, params[0])
    first, second = torch.zeros(V), torch.zeros(V)
    for s in range(N):
        par = params[s]
        d = sample(zd, [par, par], [100, 101])   # the drafts, drawn the way the head draws them
        a, tok = verify_drafts(zt, d, par, 100, p_d)
        out = d[:a] + [tok]
        first[out[0]] += 1
        if a >= 1:
            second[out[1]] += 1
    assert chisquare(first.numpy(), (p_t[0] * N).numpy()).pvalue > 1e-3
    n2 = second.sum()
    assert chisquare(second.numpy(), (p_t[1] * n2).numpy()).pvalue > 1e-3
    # and it is not the draft's: the test can tell the two apart
    assert chisquare(first.numpy(), (p_d[0] * N).numpy()).pvalue < 1e-6


def test_sampled_speculative_engine_matches_target_distribution():
    """An 8-token vocabulary: the joint of three sampled tokens from a fixed prompt, over many seeds,
    through a three-tier chain drafting at exit 0 and verifying at exit 2, against the exact joint
    computed from the reference model."""
    m = tiny_model(vocab=8, seed=5)
    V, T, prompt = 8, 1.0, [1, 2, 3]
    exact = torch.zeros(V, V, V, dtype=torch.float64)
    sp = SamplingParams(T)
    with torch.inference_mode():
        def dist(toks):
            return probs(m(torch.tensor([toks]), exits=[2])[0][0, -1:], sp)[0]
        p1 = dist(prompt)
        for a in range(V):
            p2 = dist(prompt + [a])
            for b in range(V):
                exact[a, b] = p1[a] * p2[b] * dist(prompt + [a, b])
    engines = engines_for(m, SPLITS["three tiers"], slots=64)
    N = 2400
    counts = torch.zeros(V, V, V)

    async def one(s: int):
        req = GenRequest(f"s{s}", prompt, 3, SamplingParams(T, 1.0, s + 1), exit=2,
                         speculative=Speculative(0, 2, adaptive=False))
        evs = await collect(engines[0], req)
        a, b, c = [e.token for e in evs]
        counts[a, b, c] += 1

    async def go():
        for e in engines:
            e.start()
        try:
            for b in range(0, N, 48):
                await asyncio.gather(*(one(s) for s in range(b, b + 48)))
        finally:
            for e in engines:
                await e.stop()
    asyncio.run(go())
    obs, exp = counts.flatten().double(), exact.flatten() * N
    big = exp >= 5   # chi-square needs expected counts >= 5: pool the rest into one cell
    o = torch.cat([obs[big], obs[~big].sum()[None]])
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    assert chisquare(o.numpy(), e.numpy() * o.sum().item() / e.sum().item()).pvalue > 1e-3


# ---- over gRPC -----------------------------------------------------------------------------------
def test_greedy_equals_target_over_grpc(family):
    """Three real nodes, a 5 ms round trip on each hop: equal to the target's greedy tokens, and no tier
    ever rewinds (every tier cut its sequence back to the accepted prefix when the round closed)."""
    V, G = family.model.cfg.vocab_size, family.model.cfg.G

    async def go():
        async with grpc_chain(family) as hs:
            for h in hs[:2]:
                delay_hop(h.node.engine, 5)
            async with RelayClient(f"127.0.0.1:{hs[0].port}") as c:
                st = c.generate_stream()
                rng = random.Random(11)
                drafted = accepted = 0
                for i in range(8):
                    prompt = [rng.randrange(V) for _ in range(rng.randrange(2, 24))]
                    n, target = rng.randrange(2, 32), rng.randrange(1, G)
                    req = GenRequest(f"g{i}", prompt, n, exit=target, speculative=Speculative(0, rng.randrange(1, 7)))
                    evs = [ev async for ev in st.submit(req)]
                    assert not evs[-1].error, evs[-1].error
                    assert [e.token for e in evs] == greedy_ref(family.model, prompt, target, n), (i, target)
                    assert all(e.exit == target and not e.degraded for e in evs)
                    drafted += sum(e.drafted for e in evs)
                    accepted += sum(e.accepted for e in evs)
                await st.close()
                assert 0 < accepted < drafted
                for h in hs[1:]:
                    assert h.node.engine.counters["replays"] == 0, h.node.engine.tier
    run(go())


def test_cloud_killed_mid_round_degrades_to_the_edge(family):
    """The cloud stops while rounds are in flight (20 ms per hop): the rounds after are checked against
    the edge's deepest exit (degraded, exact for it); no error, no hang; every token is the greedy token
    of the exit that reports it, given everything before it."""
    G = family.model.cfg.G
    prompt = [5, 6, 7, 8]

    async def go():
        async with grpc_chain(family) as hs:
            for h in hs[:2]:
                delay_hop(h.node.engine, 20)
            async with RelayClient(f"127.0.0.1:{hs[0].port}") as c:
                st = c.generate_stream()
                evs = []
                async for ev in st.submit(GenRequest("k", prompt, 48, exit=G - 1, speculative=Speculative(0, 4),
                                                     step_timeout_s=2.0)):
                    evs.append(ev)
                    if len(evs) == 6:
                        asyncio.ensure_future(hs[2].stop())  # mid-round: a verify is in flight or about to be
                await st.close()
        assert evs[-1].finish_reason == "length" and not evs[-1].error
        toks = list(prompt)
        for ev in evs:
            ref = greedy_ref(family.model, toks, ev.exit, 1)[0]
            assert ev.token == ref, (ev.index, ev.exit, ev.tier)
            toks.append(ev.token)
        late = evs[12:]
        assert all(e.degraded and e.exit == 1 and e.tier == "edge" for e in late), [(e.exit, e.tier) for e in late]
        assert any(e.drafted for e in late)
    run(go())
