"""Multi-exit fused linear cross-entropy: loss and gradients against the fp32-logits reference.

Tolerances: fp32 on CPU, 1e-5 relative on loss and gradients: the same fp32 matmuls, only the
logsumexp summation order differs. bf16 (GPU): the chunk logits are bf16 (rounding 2^-9 relative,
as an eager bf16 F.linear would give), the loss is an average of N such rows: 2e-3 relative on
the loss; gradients are bf16 GEMM outputs (and dW sums N/chunk bf16 roundings): 2e-2.
"""
from __future__ import annotations

import pytest
import torch

from kernels.linear_ce import multi_exit_linear_cross_entropy_reference, multi_exit_linear_cross_entropy_triton
from ktest import DEVICE, rel_err


def _case(N, H, V, G, tied, dtype=torch.float32, ignore_every=5):
    hs = [torch.randn(N, H, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(G)]
    Ws = [(torch.randn(V, H, device=DEVICE) / H**0.5 * 2).to(dtype).requires_grad_() for _ in range(1 if tied else G)]
    y = torch.randint(0, V, (N,), device=DEVICE)
    if ignore_every:
        y[::ignore_every] = -100
    return hs, Ws, y


def _run(fn, hs, Ws, y, tied, scale=1.0, **kw):
    for t in hs + Ws:
        t.grad = None
    loss, ce = fn(hs, Ws[0] if tied else Ws, y, return_per_exit=True, **kw)
    (loss * scale).backward()
    return loss.detach(), ce, [t.grad.clone() for t in hs + Ws]


@pytest.mark.parametrize("G,tied,chunk", [(1, True, None), (3, True, 16), (2, False, 7), (2, True, 9)])
@pytest.mark.parametrize("V", [341, 4231])
def test_loss_and_grads_match_reference(G, tied, chunk, V):
    # chunk sizes that do not divide N = 41 leave a partial last chunk; weights are not uniform
    hs, Ws, y = _case(41, 32, V, G, tied)
    w = [0.5, 0.3, 0.2][:G] if G > 1 else None
    l1, ce1, g1 = _run(multi_exit_linear_cross_entropy_triton, hs, Ws, y, tied, weights=w, chunk_rows=chunk)
    l2, ce2, g2 = _run(multi_exit_linear_cross_entropy_reference, hs, Ws, y, tied, weights=w)
    assert rel_err(l1, l2) < 1e-5
    assert rel_err(ce1, ce2) < 1e-5
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-5


def test_upstream_gradient_scales():
    hs, Ws, y = _case(9, 16, 341, 2, True)
    _, _, g1 = _run(multi_exit_linear_cross_entropy_triton, hs, Ws, y, True, scale=2.5)
    _, _, g2 = _run(multi_exit_linear_cross_entropy_reference, hs, Ws, y, True, scale=2.5)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-5


def test_directional_derivative():
    """Gradient check by central differences: (L(x + e d) - L(x - e d)) / 2e == <dL/dx, d>."""
    hs, Ws, y = _case(9, 16, 341, 2, True)
    loss = multi_exit_linear_cross_entropy_triton(hs, Ws[0], y, chunk_rows=4)
    loss.backward()
    with torch.no_grad():
        for x in (hs[1], Ws[0]):
            d = torch.randn_like(x)
            e = 1e-2
            x += e * d
            up = multi_exit_linear_cross_entropy_triton(hs, Ws[0], y, chunk_rows=4)
            x -= 2 * e * d
            down = multi_exit_linear_cross_entropy_triton(hs, Ws[0], y, chunk_rows=4)
            x += e * d
            fd = (up - down) / (2 * e)
            an = (x.grad * d).sum()
            # fp32 loss ~5 has rounding ~5e-7; divided by 2e = 0.02 -> ~3e-5 absolute noise
            assert abs(fd.item() - an.item()) < 1e-3 * max(1.0, abs(an.item()))


def test_no_grad_and_all_ignored():
    hs, Ws, y = _case(9, 16, 341, 2, True)
    with torch.no_grad():
        l1 = multi_exit_linear_cross_entropy_triton(hs, Ws[0], y)
        l2 = multi_exit_linear_cross_entropy_reference(hs, Ws[0], y)
    assert rel_err(l1, l2) < 1e-5
    y_ign = torch.full_like(y, -100)
    l3, ce3, g3 = _run(multi_exit_linear_cross_entropy_triton, hs, Ws, y_ign, True)
    assert l3.item() == 0.0 and torch.all(ce3 == 0)
    assert all(torch.count_nonzero(g) == 0 for g in g3)


def test_only_some_inputs_need_grad():
    hs, Ws, y = _case(9, 16, 341, 2, True)
    hs[0].requires_grad_(False)
    loss = multi_exit_linear_cross_entropy_triton(hs, Ws[0], y)
    loss.backward()
    assert hs[0].grad is None and hs[1].grad is not None and Ws[0].grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("G,tied", [(1, True), (3, True), (2, False)])
def test_bf16_gpu(G, tied):
    hs, Ws, y = _case(4231, 512, 32000, G, tied, torch.bfloat16)
    l1, ce1, g1 = _run(multi_exit_linear_cross_entropy_triton, hs, Ws, y, tied, chunk_rows=1000)
    l2, ce2, g2 = _run(multi_exit_linear_cross_entropy_reference, hs, Ws, y, tied)
    assert rel_err(l1, l2) < 2e-3
    assert rel_err(ce1, ce2) < 2e-3
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 2e-2


def test_autocast_casts_like_f_linear_and_returns_fp32_grads():
    """Under autocast (bf16 training, fp32 master weights) inputs are cast as F.linear would be;
    gradients reach the fp32 leaves. Tolerance: bf16 inputs and logits, 2e-2 (see module docstring)."""
    hs, Ws, y = _case(41, 32, 341, 2, True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        l1, _, g1 = _run(multi_exit_linear_cross_entropy_triton, hs, Ws, y, True)
    l2, _, g2 = _run(multi_exit_linear_cross_entropy_reference, hs, Ws, y, True)
    assert all(g.dtype == torch.float32 for g in g1)
    assert rel_err(l1, l2) < 2e-2
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 5e-2
