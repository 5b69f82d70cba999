"""The stage loop over a KV pool equals the full model: chunked prefills, decode steps, packed batches
of sequences at different positions, mixed exits with pending catch-up, every model variant."""
import random

import pytest
import torch

from stage_helpers import chunked_logits
from trunk import FamilyModel, get_preset
from trunk.kv_pool import KVPool, PoolError, PoolShape, plan_slots
from trunk.stage import SeqRun, Stage, StageError

VARIANTS = [{}, {"branch_layers": 1, "adapter_rank": 4, "exit_unembed": "own"},
            {"qkv_bias": True, "tie_embeddings": False, "n_kv_heads": 4}]


def _model(**kw):
    torch.manual_seed(0)
    m = FamilyModel(get_preset("tiny").replace(**kw)).eval()
    with torch.no_grad():  # larger weights than the init so the exits disagree and argmax margins are wide
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return m


@pytest.mark.parametrize("kw", VARIANTS)
def test_chunks_over_the_pool_equal_the_full_forward(kw):
    model = _model(**kw)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 23), generator=torch.Generator().manual_seed(1))
    got = chunked_logits(model, tokens, [(0, 9), (9, 10), (10, 17), (17, 18), (18, 23)])
    with torch.no_grad():
        full = model(tokens)
    for g in range(model.cfg.G):
        torch.testing.assert_close(got[g], full[g], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw,kernels_mode", [(kw, "torch") for kw in VARIANTS] + [(VARIANTS[0], "triton")])
def test_fused_serving_blocks_equal_the_full_forward(kw, kernels_mode, monkeypatch):
    """trunk/fused.py's blocks (fused projections, add+norm folded into the exit head, one-row linears)
    through the kernels' references and, under the Triton interpreter, the kernels themselves (fp32).
    Chunks of one row per sequence are the decode shape the one-row linear kernel serves."""
    if kernels_mode == "triton" and torch.cuda.is_available():
        pytest.skip("the interpreter case; on CUDA tests/relay/test_tier_engine_gpu.py runs the kernels")
    if kernels_mode == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FAMILIAL_KERNELS", kernels_mode)
    model = _model(**kw)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
    if kernels_mode == "triton":  # 16-bit weights: the one-row linear kernel's dtypes
        model = model.half()
    got = chunked_logits(model, tokens, [(0, 7), (7, 8), (8, 9), (9, 12)], fused=True)
    for g in range(model.cfg.G):
        if kernels_mode == "torch":
            torch.testing.assert_close(got[g], full[g], rtol=0, atol=1e-4)
        else:
            assert ((got[g].float() - full[g]).norm() / full[g].norm()).item() < 1e-2


@pytest.mark.parametrize("kw", VARIANTS)
def test_packed_batches_with_mixed_exits_and_pending_positions(kw):
    """Sequences join and skip steps at random, each step asks each a random exit: shallow answers leave
    positions pending deeper, caught up when a deeper exit is asked (in the same packed batch)."""
    model = _model(**kw)
    cfg = model.cfg
    st = Stage(model, list(range(cfg.G)))
    pool = KVPool(st.pool_shape(64), 6, "cpu")
    rng = random.Random(0)
    seqs = [{"toks": [rng.randrange(cfg.vocab_size) for _ in range(rng.randrange(1, 9))], "len": 0,
             "seg": [0] * cfg.G, "slot": pool.alloc()} for _ in range(6)]
    checked, pending = 0, False
    for _ in range(12):
        act = [b for b in range(6) if rng.random() < 0.8]
        runs, xs, gs = [], [], []
        for b in act:
            s = seqs[b]
            new = s["toks"][s["len"]:]
            gs.append(rng.randrange(cfg.G))
            runs.append(SeqRun(s["slot"], s["len"], len(new), list(s["seg"]), want=gs[-1]))
            xs += new
        if not runs:
            continue
        out = st.forward(torch.tensor(xs), runs, pool)
        for b, r, o, g in zip(act, runs, out.seqs, gs):
            s = seqs[b]
            pending |= r.seg_lens[-1] < r.seg_lens[0]
            s["seg"], s["len"] = r.seg_lens, len(s["toks"])
            with torch.no_grad():
                want = int(model(torch.tensor([s["toks"]]), exits=[g])[0][0, -1].argmax())
            assert (o.exit, o.token) == (g, want)
            s["toks"].append(o.token)
            checked += 1
    assert checked > 40 and pending  # some steps left positions pending deeper, later caught up


def test_stage_refuses_what_it_cannot_run():
    model = _model()
    st = Stage(model, [0, 1, 2])
    pool = KVPool(st.pool_shape(16), 2, "cpu")
    with pytest.raises(StageError, match="outside the pool"):
        st.forward(torch.zeros(4, dtype=torch.long), [SeqRun(0, 14, 4, [14, 14, 14], want=0)], pool)
    with pytest.raises(StageError, match="rows"):
        st.forward(torch.zeros(3, dtype=torch.long), [SeqRun(0, 0, 4, [0, 0, 0], want=0)], pool)
    with pytest.raises(StageError, match="consecutive"):
        Stage(model, [0, 2])
    edge = Stage(model, [1, 2], has_embedding=False)
    with pytest.raises(StageError, match="shallower"):
        edge.forward(torch.zeros(1, 64), [SeqRun(0, 0, 1, [0, 0], want=0)], KVPool(edge.pool_shape(16), 1, "cpu"))


def test_pool_sizing_from_a_budget():
    shape = PoolShape(n_layers=4, n_kv_heads=2, head_dim=16, n_logs=2, d_model=64, max_len=256, dtype=torch.float32)
    assert shape.bytes_per_token() == 4 * (2 * 4 * 2 * 16 + 2 * 64)
    assert plan_slots(shape, "cpu", memory_bytes=10 * shape.bytes_per_slot() + 5) == 10
    assert plan_slots(shape, "cpu", memory_bytes=10 ** 12, max_slots=7) == 7
    with pytest.raises(PoolError, match="needs"):
        plan_slots(shape, "cpu", memory_bytes=100)
    pool = KVPool(shape, 3, "cpu")
    assert [pool.alloc() for _ in range(4)] == [0, 1, 2, None]
    pool.free(1)
    assert pool.alloc() == 1
    with pytest.raises(PoolError):
        pool.free(5)
