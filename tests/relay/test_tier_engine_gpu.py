"""On CUDA: the tier engine with fused blocks, Triton attention and CUDA graphs gives the full model's
greedy tokens for concurrent requests at mixed exits and prompt lengths (fp32, so only summation order
differs), and decode steps really replay graphs."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_graphs_and_fused_kernels_keep_greedy_tokens_exact():
    from relay.node import NodeConfig, make_pool
    from relay.tier import TierConfig, TierEngine
    from relay.work import GenRequest
    from trunk import FamilyModel, get_preset
    from trunk.stage import Stage

    torch.manual_seed(0)
    model = FamilyModel(get_preset("builtin").replace(branch_layers=1)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    stage = Stage(model, [0, 1, 2])
    assert stage.fused, "on CUDA the stage runs the fused blocks"
    pool = make_pool(stage, NodeConfig(max_slots=16, kv_memory_mb=512))
    eng = TierEngine(stage, pool, "gpu", None, TierConfig(max_batch_tokens=64, max_batch_seqs=16, offload=False))
    assert eng.capture_graphs() > 0
    rng = random.Random(0)
    reqs = [GenRequest(f"g{i}", [rng.randrange(2048) for _ in range(rng.randint(1, 90))], rng.randint(1, 24),
                       exit=rng.randrange(3), ignore_eos=True) for i in range(12)]

    def ref(r):
        toks = list(r.prompt_ids)
        with torch.inference_mode():
            for _ in range(r.max_tokens):
                toks.append(int(model(torch.tensor([toks], device="cuda"), exits=[r.exit])[0][0, -1].argmax()))
        return toks[len(r.prompt_ids):]

    async def go():
        eng.start()

        async def one(r):
            return [ev.token async for ev in eng.stream(r) if ev.token >= 0]
        out = await asyncio.gather(*(one(r) for r in reqs))
        await eng.stop()
        return out
    got = asyncio.run(go())
    want = [ref(r) for r in reqs]
    assert got == want
    assert stage.graphs.replays > 15
    assert eng.counters["bursts"] > 0, "requests at different exits decode in bursts (the mixed graph)"


def test_decode_bursts_keep_greedy_tokens_exact():
    """Greedy requests at the final exit decode in bursts (several graph replays per host round, each
    step's argmax fed to the next on the device): tokens equal the full model's, requests of different
    lengths stop where they should (max_tokens, EOS), one arriving mid-burst joins, one replanned to a
    shallower exit mid-stream switches within a burst and its later tokens follow the new exit."""
    from relay.node import NodeConfig, make_pool
    from relay.tier import TierConfig, TierEngine
    from relay.work import GenRequest
    from trunk import FamilyModel, get_preset
    from trunk.stage import Stage

    torch.manual_seed(1)
    model = FamilyModel(get_preset("builtin")).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    G = model.cfg.G
    stage = Stage(model, list(range(G)))
    pool = make_pool(stage, NodeConfig(max_slots=16, kv_memory_mb=512))
    eng = TierEngine(stage, pool, "gpu", None, TierConfig(max_batch_tokens=256, max_batch_seqs=16, offload=True,
                                                          decode_burst=8))
    eng.capture_graphs()
    rng = random.Random(3)

    def ref(prompt, n, exits):
        toks = list(prompt)
        with torch.inference_mode():
            for j in range(n):
                toks.append(int(model(torch.tensor([toks], device="cuda"), exits=[exits(j)])[0][0, -1].argmax()))
        return toks[len(prompt):]

    prompts = [[rng.randrange(2048) for _ in range(rng.randint(2, 40))] for _ in range(6)]
    lens = [1, 5, 9, 17, 30, 40]
    eos_stream = ref(prompts[3], 17, lambda j: G - 1)
    reqs = [GenRequest(f"b{i}", p, n, ignore_eos=True) for i, (p, n) in enumerate(zip(prompts, lens))]
    reqs[3].ignore_eos, reqs[3].eos_ids = False, (eos_stream[6],)      # stops at its 7th token (or earlier)
    late = GenRequest("late", prompts[0], 12, ignore_eos=True)
    replanned = reqs[5]

    async def go():
        eng.start()
        out = {}

        async def one(r, wait=0.0, replan_after=None):
            await asyncio.sleep(wait)
            toks = []
            async for ev in eng.stream(r):
                if ev.token >= 0:
                    toks.append((ev.token, ev.exit))
                if replan_after is not None and len(toks) == replan_after:
                    eng.update(r.request_id, 0)
            out[r.request_id] = toks
        await asyncio.gather(*(one(r, replan_after=10 if r is replanned else None) for r in reqs),
                             one(late, wait=0.05))
        await eng.stop()
        return out
    got = asyncio.run(go())
    for i, r in enumerate(reqs[:5]):
        want = ref(r.prompt_ids, r.max_tokens, lambda j: G - 1)
        if i == 3:
            want = want[:want.index(eos_stream[6]) + 1]
        assert [t for t, _ in got[r.request_id]] == want, r.request_id
    assert [t for t, _ in got["late"]] == ref(late.prompt_ids, 12, lambda j: G - 1)
    exits = [e for _, e in got[replanned.request_id]]
    switch = exits.index(0)
    assert 10 <= switch <= 10 + 8 + 1 and set(exits[switch:]) == {0} and set(exits[:switch]) == {G - 1}
    assert [t for t, _ in got[replanned.request_id]] == ref(replanned.prompt_ids, 40,
                                                            lambda j: G - 1 if j < switch else 0)
    assert eng.counters["bursts"] > 0 and eng.counters["steps"] > eng.counters["bursts"]
