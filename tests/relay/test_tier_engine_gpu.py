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
    assert stage.graphs.replays > 50
