"""GPU checks that trunk/ reaches the kernels: the training loss through the fused linear-CE, the
stage forward (prefill, cached chunks, decode steps) through the attention kernels, and that both
agree with trunk's plain PyTorch paths. On CPU the trunk never calls a kernel, so these are GPU-only.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from ktest import rel_err

pytestmark = pytest.mark.gpu


def _model(preset="builtin", dtype=torch.float32):
    from trunk import FamilyModel, get_preset
    torch.manual_seed(0)
    return FamilyModel(get_preset(preset)).cuda().to(dtype)


def _count(monkeypatch, name):
    calls = []
    orig = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


def test_family_loss_uses_fused_linear_ce(monkeypatch):
    from trunk.loss import family_loss
    model = _model()
    tok = torch.randint(0, model.cfg.vocab_size, (4, 129), device="cuda")
    x, y = tok[:, :-1], tok[:, 1:]
    calls = _count(monkeypatch, "multi_exit_linear_cross_entropy_triton")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, per = family_loss(model, x, y)
    loss.backward()
    g_fused = model.embed.weight.grad.clone()
    assert calls, "family_loss did not reach the fused kernel on CUDA"
    model.zero_grad()
    monkeypatch.setenv("FAMILIAL_KERNELS", "torch")  # same trunk code, the kernels' fp32 reference
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_ref, per_ref = family_loss(model, x, y)
    loss_ref.backward()
    # bf16 autocast features and logits on the fused path vs fp32 logits: ~1e-3 on a mean CE
    assert rel_err(loss.detach(), loss_ref.detach()) < 1e-2
    assert rel_err(per, per_ref) < 1e-2
    assert rel_err(g_fused, model.embed.weight.grad) < 5e-2


def test_stage_over_the_pool_matches_full_forward(monkeypatch):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trunk"))
    from stage_helpers import chunked_logits

    model = _model().eval()
    tok = torch.randint(0, model.cfg.vocab_size, (2, 53), device="cuda")
    dec = _count(monkeypatch, "decode_attention_triton")
    pre = _count(monkeypatch, "prefill_attention_triton")
    with torch.no_grad():
        full = model(tok)
        # prefill, a chunk over the cache, short chunks, decode steps
        got = chunked_logits(model, tok, [(0, 33), (33, 45), (45, 48), (48, 49), (49, 50), (50, 51), (51, 53)])
    assert dec and pre, "the stage did not reach the attention kernels"
    # fp32 everywhere (IEEE dots in the kernels): only summation order differs
    for g in range(model.cfg.G):
        assert rel_err(got[g], full[g]) < 1e-4
