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


def test_stage_forward_with_cache_matches_full_forward(monkeypatch):
    from trunk import KVCache
    model = _model().eval()
    L = model.cfg.n_layers
    tok = torch.randint(0, model.cfg.vocab_size, (2, 53), device="cuda")
    dec = _count(monkeypatch, "decode_attention_triton")
    pre = _count(monkeypatch, "prefill_attention_triton")
    with torch.no_grad():
        full = model.run_layers(model.embed_tokens(tok), 0, L)
        cache, outs, pos = KVCache(), [], 0
        for n in (33, 12, 3, 1, 1, 1, 1, 1):  # prefill, a chunk over the cache, drafts, decode steps
            h = model.embed_tokens(tok[:, pos:pos + n])
            outs.append(model.run_layers(h, 0, L, pos=pos, cache=cache))
            pos += n
    assert dec and pre, "stage forward did not reach the attention kernels"
    # fp32 everywhere (IEEE dots in the kernels): only summation order differs
    assert rel_err(torch.cat(outs, 1), full) < 1e-4
