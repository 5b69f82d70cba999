"""LocalEngine keeps the relay's KV invariant: for any sequence of exit choices, each step's greedy token
equals a single-process full-model run over the same tokens at that exit."""
from __future__ import annotations

import asyncio
import random

import torch

from serving.engine import LocalEngine, SamplingParams


def test_any_exit_sequence_matches_full_model():
    from trunk import FamilyModel, get_preset
    from trunk.tokenizer import ByteTokenizer

    torch.manual_seed(3)
    model = FamilyModel(get_preset("tiny").replace(branch_layers=1)).eval()
    with torch.no_grad():  # wider logit margins so argmax is stable across the two computation orders
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    eng = LocalEngine(model, ByteTokenizer())
    rng = random.Random(0)

    async def run(exits: list[int]) -> None:
        s = await eng._open(64)
        tokens = [rng.randrange(256) for _ in range(5)]
        ids, pos = list(tokens), 0
        for g in exits:
            res = await eng._step(s, ids, pos, g, SamplingParams(temperature=0.0))
            with torch.inference_mode():
                want = int(model(torch.tensor([tokens]), exits=[g])[0][0, -1].argmax())
            assert res.token == want and res.exit == g and res.tier == eng.exit_tiers[g]
            assert set(res.timings) == set(eng.info.tiers[: eng.info.tiers.index(res.tier) + 1])
            pos += len(ids)
            ids = [res.token]
            tokens.append(res.token)

    for _ in range(6):
        asyncio.run(run([rng.randrange(3) for _ in range(10)]))
    asyncio.run(run([0, 0, 0, 2, 1, 1, 0, 2]))
