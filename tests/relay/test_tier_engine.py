"""The tier engine without a network: batched steps over a KV pool equal the full model, token for
token, whatever mixes in a batch (prompt lengths, exits, chunked prefills, pending catch-up), across
an in-process chain of tiers, with evictions (preempt + recompute) and a pool far smaller than the load."""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from relay.tier import LocalDownstream, TierConfig, TierEngine
from relay.work import GenRequest, Item
from trunk import FamilyModel, get_preset
from trunk.kv_pool import KVPool
from trunk.sampling import ExitPolicy, SamplingParams
from trunk.stage import Stage


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    m = FamilyModel(get_preset("tiny").replace(branch_layers=1)).eval()
    with torch.no_grad():  # larger weights than the init so the exits disagree and argmax margins are wide
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return m


def greedy_ref(model, prompt: list[int], g: int, n: int) -> list[int]:
    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            toks.append(int(model(torch.tensor([toks]), exits=[g])[0][0, -1].argmax()))
    return toks[len(prompt):]


def chain(model, split: list[list[int]], slots: list[int], **conf) -> list[TierEngine]:
    engines, down = [], None
    for exits, n in reversed(list(zip(split, slots))):
        st = Stage(model, exits)
        e = TierEngine(st, KVPool(st.pool_shape(160), n, "cpu"), f"tier{exits[0]}", down,
                       TierConfig(offload=False, **conf))
        engines.insert(0, e)
        down = LocalDownstream(e)
    return engines


def requests(model, n: int, seed: int):
    rng = random.Random(seed)
    V, G = model.cfg.vocab_size, model.cfg.G
    return [GenRequest(f"r{i}", [rng.randrange(V) for _ in range(rng.randrange(1, 30))], rng.randrange(1, 14),
                       exit=rng.randrange(G)) for i in range(n)]


async def _collect(engine, req):
    out = []
    async for ev in engine.stream(req):
        assert not ev.error, ev.error
        out.append((ev.token, ev.exit))
    return out


def run_all(engines, reqs, concurrent: bool):
    async def go():
        for e in engines:
            e.start()
        try:
            if concurrent:
                return await asyncio.gather(*(_collect(engines[0], r) for r in reqs))
            return [await _collect(engines[0], r) for r in reqs]
        finally:
            await asyncio.sleep(0.01)  # releases travel down the chain
            for e in engines:
                await e.stop()
    return asyncio.run(go())


SPLITS = {"one tier": ([[0, 1, 2]], [16]), "three tiers": ([[0], [1], [2]], [16, 16, 16])}


@pytest.mark.parametrize("split", SPLITS)
def test_concurrent_requests_equal_one_at_a_time_and_the_full_model(model, split):
    exits, slots = SPLITS[split]
    reqs = requests(model, 10, seed=1)
    together = run_all(chain(model, exits, slots, max_batch_tokens=24), reqs, concurrent=True)
    alone = run_all(chain(model, exits, slots), reqs, concurrent=False)
    assert together == alone
    for r, out in zip(reqs, together):
        assert [t for t, _ in out] == greedy_ref(model, r.prompt_ids, r.exit, r.max_tokens)
        assert {g for _, g in out} == {r.exit}


def test_preemption_and_recompute_keep_tokens_exact(model):
    # deeper tiers hold 3 and 2 sequences for 10 concurrent requests: idle sequences are evicted there
    # and replayed from the upstream's log when they come back
    engines = chain(model, [[0], [1], [2]], [5, 3, 2], max_batch_tokens=32)
    reqs = requests(model, 10, seed=2)
    got = run_all(engines, reqs, concurrent=True)
    for r, out in zip(reqs, got):
        assert [t for t, _ in out] == greedy_ref(model, r.prompt_ids, r.exit, r.max_tokens)
    assert engines[1].counters["evicted"] + engines[2].counters["evicted"] > 0
    assert engines[0].counters["replays"] + engines[1].counters["replays"] > 0


def test_pool_far_smaller_than_the_load_loses_nothing(model):
    engines = chain(model, [[0, 1, 2]], [3], max_batch_tokens=64)
    reqs = [GenRequest(f"q{i}", [i % 200 + 1, 7], 3, exit=i % 3, ignore_eos=True) for i in range(60)]
    got = run_all(engines, reqs, concurrent=True)
    assert all(len(o) == 3 for o in got)
    assert engines[0].pool.n_free == 3 and not engines[0].seqs


@pytest.mark.parametrize("split", SPLITS)
def test_any_exit_sequence_matches_the_full_model(model, split):
    """Step by step with a random exit per step: shallow steps leave positions pending deeper, the next
    deep step catches them up in the same batch (the KV-consistency invariant)."""
    exits, slots = SPLITS[split]
    G = model.cfg.G

    async def go():
        engines = chain(model, exits, slots, max_batch_tokens=8)
        for e in engines:
            e.start()
        rng = random.Random(3)

        async def one(k: int):
            sid = f"s{k}"
            engines[0].open(sid)
            toks = [rng.randrange(model.cfg.vocab_size) for _ in range(rng.randrange(1, 12))]
            pos = 0
            for _ in range(10):
                g = rng.randrange(G)
                res = await engines[0].forward(Item(sid, pos, torch.tensor(toks[pos:]), g))
                assert res.ok and res.exit == g, res
                assert res.token == greedy_ref(model, toks, g, 1)[0]
                pos = len(toks)
                toks.append(res.token)
        await asyncio.gather(*(one(k) for k in range(6)))
        for e in engines:
            await e.stop()
    asyncio.run(go())


def test_confidence_policy_answers_at_the_first_confident_exit(model):
    async def go():
        (e,) = chain(model, [[0, 1, 2]], [4])
        e.start()
        e.open("c")
        rng = random.Random(5)
        toks, pos, seen = [5, 9, 200, 31], 0, set()
        for _ in range(16):
            with torch.inference_mode():
                probs = [float(torch.softmax(model(torch.tensor([toks]), exits=[g])[0][0, -1].double(), -1).max())
                         for g in range(3)]
            srt, i = sorted(probs), rng.randrange(2)
            thr = (srt[i] + srt[i + 1]) / 2  # between two exits' confidences: some pass, some don't
            want = next((g for g in range(3) if probs[g] >= thr), 2)
            res = await e.forward(Item("c", pos, torch.tensor(toks[pos:]), 2, ExitPolicy("max_prob", thr)))
            assert res.exit == want
            assert res.token == greedy_ref(model, toks, want, 1)[0]
            assert [c[0] for c in res.confidence] == list(range(want + 1))
            seen.add(want)
            pos = len(toks)
            toks.append(res.token)
        await e.stop()
        return seen
    assert len(asyncio.run(go())) >= 2  # the policy really chose between exits


def test_sampling_is_reproducible_whatever_the_batch(model):
    s = SamplingParams(temperature=1.3, top_p=0.9, seed=77)
    reqs = [GenRequest(f"t{i}", [3, 1, 4, 1, 5], 12, sampling=s, exit=i % 3, ignore_eos=True) for i in range(6)]
    alone = run_all(chain(model, [[0, 1, 2]], [8]), reqs[:3], concurrent=False)
    mixed = run_all(chain(model, [[0], [1], [2]], [8, 8, 8]), reqs, concurrent=True)
    assert mixed[:3] == alone
    assert len({tuple(t for t, _ in o) for o in alone}) > 1   # different exits really sample differently


def test_rows_is_a_view_when_chunks_are_consecutive_else_a_copy():
    """A step's rows from one upstream message in order become one view of it (no copy); any gap,
    reordering or second buffer falls back to cat. Values are the same either way."""
    from relay.tier import _rows

    h = torch.randn(64, 8)
    got = _rows([h[0:5], h[5:6], h[6:40]])
    assert got.data_ptr() == h.data_ptr() and got.shape == (40, 8) and torch.equal(got, h[:40])
    for xs in ([h[0:5], h[6:8]], [h[10:12], h[0:2]], [h[0:2], torch.randn(3, 8)], [h[0:4, :4], h[4:8, :4]]):
        got = _rows(xs)
        assert torch.equal(got, torch.cat(xs)) and got.data_ptr() != h.data_ptr()
    one = h[3:9]
    assert _rows([one]) is one


def test_one_group_two_deadlines_each_answered_at_its_own(model):
    """Two sequences go deeper in one step (one deadline timer for the group): the one whose deadline
    passes while the deeper tier works answers degraded from this tier's exit at its deadline; the other,
    with time left, waits for the deeper tier's answer."""
    G = model.cfg.G

    async def go():
        engines = chain(model, [[0], list(range(1, G))], [4, 4], deadline_margin_ms=0, micro_batches=1)
        engines[1].conf.step_delay_ms = 1500
        for e in engines:
            e.start()
        toks = [3, 1, 4, 1, 5]
        for sid in ("early", "late"):
            engines[0].open(sid)
        now, t0 = time.monotonic(), time.perf_counter()
        early = asyncio.ensure_future(engines[0].forward(Item("early", 0, torch.tensor(toks), G - 1,
                                                              deadline=now + 0.25)))
        late = asyncio.ensure_future(engines[0].forward(Item("late", 0, torch.tensor(toks), G - 1,
                                                             deadline=now + 10.0)))
        r_early = await early
        t_early = time.perf_counter() - t0
        r_late = await late
        t_late = time.perf_counter() - t0
        assert engines[0].counters["steps"] == 1, "both went deeper from one step"
        assert r_early.degraded and "DEADLINE_EXCEEDED" in r_early.reason and r_early.exit == 0, r_early
        assert r_early.token == greedy_ref(model, toks, 0, 1)[0]
        assert 0.2 < t_early < 1.2, t_early  # at its deadline, not with the deeper tier's answer (1.5 s)
        assert not r_late.degraded and r_late.exit == G - 1, r_late
        assert r_late.token == greedy_ref(model, toks, G - 1, 1)[0]
        assert t_late >= 1.5, t_late
        for e in engines:
            await e.stop()
    asyncio.run(go())


def test_micro_batches_split_at_the_head_only(model):
    """With micro-batches the head runs a third of the runnable sequences per step and forwards each group
    as one message; deeper tiers take each group whole (they never run more steps than the tier above),
    and the tokens are those of the requests run one at a time."""
    G = model.cfg.G
    reqs = [GenRequest(f"m{i}", [(7 * i + j) % model.cfg.vocab_size for j in range(4 + i % 3)], 6, exit=G - 1)
            for i in range(9)]
    engines = chain(model, [[0], [1], [2]], [16, 16, 16], micro_batches=3)
    together = run_all(engines, reqs, concurrent=True)
    steps = [e.counters["steps"] for e in engines]
    rows = [e.counters["rows"] for e in engines]
    alone = run_all(chain(model, [[0], [1], [2]], [16, 16, 16], micro_batches=1), reqs, concurrent=False)
    assert together == alone
    assert steps[1] <= steps[0] and steps[2] <= steps[1], steps
    assert rows[0] / steps[0] < len(reqs), (rows, steps)  # the head did split
