"""Exactness across tiers: three real nodes (device -> edge -> cloud) on loopback.

For 20 random sequences of exit choices over 32 greedy tokens, all generating at once (so the tier
engines batch them, with shallow and deep sequences in the same steps), every token must equal a single-process
run of the full model that makes the same exit choices: at each step, run the whole model on all
tokens so far and take argmax of the chosen exit's logits at the last position. Exits that skip a
deeper tier leave pending positions there; this checks they are relayed before the next deep step.
"""
import asyncio
import random

import pytest
import torch

from relay.client import RelayClient
from trunk.sampling import ExitPolicy, SamplingParams
from tests.relay.relay_helpers import chain, run

N_SEQ, N_TOK = 20, 32


async def _generate(client, fam, rng, n_tok, exit_choices, prompt, check=True):
    sid = await client.open_session()
    toks, new, pos = list(prompt), list(prompt), 0
    mismatches, tiers = [], []
    for step in range(n_tok):
        g = exit_choices[step]
        r = await client.forward(sid, new, pos, exit=g)
        assert r.exit == g and not r.degraded, (r.exit, g, r.reason)
        tiers.append(r.tier)
        if check:
            want = fam.ref_token(toks, g)
            if r.token != want:
                mismatches.append((step, g, r.token, want))
        pos += len(new)
        toks.append(r.token)
        new = [r.token]
    await client.close_session(sid)
    return toks, mismatches, tiers


def _exact(fam, stages=None, n_seq=N_SEQ, seed=0):
    async def go():
        G = fam.model.cfg.G
        rng = random.Random(seed)
        async with chain(fam, stages=stages) as (dev, edge, cloud):
            client = RelayClient(f"127.0.0.1:{dev.port}")
            bad, seen, jobs = [], set(), []
            for i in range(n_seq):
                prompt = [rng.randrange(fam.model.cfg.vocab_size) for _ in range(rng.randint(1, 12))]
                # mix of uniform choices and long shallow runs followed by a deep jump
                choices = ([rng.randrange(G) for _ in range(N_TOK)] if i % 2 == 0 else
                           [G - 1 if rng.random() < 0.15 else 0 for _ in range(N_TOK)])
                jobs.append(_generate(client, fam, rng, N_TOK, choices, prompt))
            for i, (_, mm, tiers) in enumerate(await asyncio.gather(*jobs)):
                bad += [(i, *m) for m in mm]
                seen.update(tiers)
            st = [await RelayClient(f"127.0.0.1:{h.port}").stats() for h in (dev, edge, cloud)]
            await client.close()
            return bad, seen, st
    bad, seen, st = run(go())
    assert not bad, f"{len(bad)} tokens differ from the single-process run (seq, step, exit, got, want): {bad[:5]}"
    assert seen == {"device", "edge", "cloud"}
    assert all(s["live_sessions"] == 0 for s in st), "close_session must propagate down the chain"
    for s in st:  # how busy each tier was: stage time within its process's CPU and its uptime
        assert s["engine"]["steps"] > 0 and 0 < s["engine"]["stage_s"] < s["process"]["uptime_s"], s
        assert 0 < s["process"]["cpu_s"], s


def test_exact_tiny_family(tiny_family):
    _exact(tiny_family)


def test_exact_builtin_family(builtin_family):
    if builtin_family is None:
        pytest.skip("trunk/builtin/ has no trained checkpoint yet (tiny random family covers exactness)")
    _exact(builtin_family)


@pytest.mark.slow  # 21 s on the shared 2-core box (ONNX export, then a chain on loopback)
def test_exact_with_onnx_device_tier(family, tmp_path):
    """The device tier on ONNX Runtime: every token's argmax equals the single-process PyTorch run."""
    import shutil

    onnx_mod = pytest.importorskip("deploy.onnx_export")
    from tests.relay.relay_helpers import stage
    shards = tmp_path / "shards"
    shutil.copytree(family.shards, shards)
    onnx_mod.export_tier(shards, "device")
    check = onnx_mod.check_tier(shards, "device")["summary"]
    print(f"ONNX vs PyTorch device tier: max abs logits diff {check['max_abs_diff']:.3g}, "
          f"h_out {check['max_abs_diff_h_out']:.3g}, argmax equal {check['argmax_equal']}")
    dev = onnx_mod.OnnxTierStage(shards, "device")
    _exact(family, stages={"device": dev, "edge": stage(family, "edge"), "cloud": stage(family, "cloud")})

    async def flag():  # the CLI path: --onnx loads the exported graph from the shard directory
        from relay.cli import start_node
        h = await start_node(str(shards), "device", onnx=True)
        c = RelayClient(f"127.0.0.1:{h.port}")
        info = await c.family_info()
        sid = await c.open_session()
        r = await c.forward(sid, [1, 2, 3], 0, exit=0)
        await c.close()
        await h.stop()
        return info, r
    info, r = run(flag())
    assert info["tiers"][0]["onnx"] and r.tier == "device" and r.token == family.ref_token([1, 2, 3], 0)


def test_confidence_policy_matches_reference(family):
    """max_prob policy: the answer comes from the first exit whose max probability passes."""
    async def go():
        G = family.model.cfg.G
        rng = random.Random(7)
        async with chain(family) as (dev, _, _):
            c = RelayClient(f"127.0.0.1:{dev.port}")
            sid = await c.open_session()
            toks = [rng.randrange(family.model.cfg.vocab_size) for _ in range(5)]
            new, pos, exits = list(toks), 0, set()
            for step in range(24):
                probs = [torch.softmax(family.ref_logits(toks, g).double(), -1).max().item() for g in range(G)]
                srt, i = sorted(probs), rng.randrange(G - 1)
                thr = (srt[i] + srt[i + 1]) / 2  # between two exits' confidences: some pass, some don't
                want_g = next((g for g in range(G) if probs[g] >= thr), G - 1)
                r = await c.forward(sid, new, pos, policy=ExitPolicy("max_prob", thr))
                assert r.exit == want_g, (step, probs, thr, r.exit)
                assert r.token == family.ref_token(toks, want_g)
                assert [c[0] for c in r.confidence] == list(range(want_g + 1))
                exits.add(r.exit)
                pos += len(new)
                toks.append(r.token)
                new = [r.token]
            await c.close()
            return exits
    assert len(run(go())) >= 2


def test_sampling_reproducible_per_seed(family):
    async def go():
        async with chain(family) as (dev, _, _):
            c = RelayClient(f"127.0.0.1:{dev.port}")
            outs = []
            for seed in (5, 5, 6):
                sid = await c.open_session()
                new, pos, got = [1, 2, 3], 0, []
                for step in range(12):
                    r = await c.forward(sid, new, pos, exit=step % 3 if step % 3 < family.model.cfg.G else None,
                                        sampling=SamplingParams(temperature=1.5, top_p=0.9, seed=seed))
                    got.append(r.token)
                    pos += len(new)
                    new = [r.token]
                outs.append(got)
                await c.close_session(sid)
            await c.close()
            return outs
    a, b, c = run(go())
    assert a == b and a != c
