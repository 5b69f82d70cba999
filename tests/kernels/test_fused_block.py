"""Fused serving-block kernels against their PyTorch references (interpreter on CPU, native on GPU),
odd shapes; and the references against trunk.model's own math."""
from __future__ import annotations

import pytest
import torch

from kernels.fused_block import (add_rmsnorm_reference, add_rmsnorm_triton, rope_qkv_reference, rope_qkv_triton,
                                 silu_mul_reference, silu_mul_triton)
from ktest import DEVICE, rel_err
from trunk.model import RMSNorm, apply_rope, rope_tables

# fp32: only summation order differs (rel ~1e-7); fp16: one rounding of the output (rel ~5e-4)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(1, 64), (9, 41), (41, 192), (5, 2048)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm(dtype, N, D, with_delta):
    g = torch.Generator().manual_seed(N * D)
    h = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    d = torch.randn(N, D, generator=g).to(DEVICE, dtype) if with_delta else None
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    h1, y1 = add_rmsnorm_triton(h, d, w, 1e-5)
    h2, y2 = add_rmsnorm_reference(h, d, w, 1e-5)
    assert torch.equal(h1, h2)
    assert rel_err(y1, y2) < TOL[dtype]


def test_add_rmsnorm_reference_is_the_models_norm():
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(7, 48)
    assert torch.equal(add_rmsnorm_reference(x, None, norm.weight.detach(), 1e-6)[1], norm(x).detach())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,K,E", [(1, 4, 2, 16), (7, 6, 2, 32), (13, 32, 4, 64), (3, 12, 12, 64)])
def test_rope_qkv(dtype, N, H, K, E):
    g = torch.Generator().manual_seed(N + H)
    qkv = torch.randn(N, (H + 2 * K) * E, generator=g).to(DEVICE, dtype)
    cos, sin = rope_tables(E, 64, 10000.0)
    cos, sin = cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)
    pos = torch.randint(0, 64, (N,), generator=g).to(DEVICE)
    slots = torch.randint(0, 3, (N,), generator=g).to(DEVICE, torch.int32)
    slots[:] = torch.arange(N) % 3
    pos[:] = torch.arange(N) * 3 + 1  # distinct (slot, pos) per row
    caches = [torch.full((3, K, 64, E), -7.0, device=DEVICE, dtype=dtype) for _ in range(4)]
    q1 = rope_qkv_triton(qkv, pos, slots, cos, sin, caches[0], caches[1], H, K)
    q2 = rope_qkv_reference(qkv, pos, slots, cos, sin, caches[2], caches[3], H, K)
    assert rel_err(q1, q2) < TOL[dtype]
    assert rel_err(caches[0], caches[2]) < TOL[dtype] and torch.equal(caches[1], caches[3])
    assert (caches[0] == -7.0).sum() == (caches[2] == -7.0).sum()  # nothing else written


def test_rope_qkv_reference_matches_the_models_rope():
    N, H, K, E = 5, 4, 2, 16
    qkv = torch.randn(N, (H + 2 * K) * E)
    cos, sin = rope_tables(E, 32, 10000.0)
    pos = torch.tensor([0, 3, 7, 8, 31])
    kc, vc = torch.zeros(1, K, 32, E), torch.zeros(1, K, 32, E)
    q = rope_qkv_reference(qkv, pos, torch.zeros(N, dtype=torch.int32), cos, sin, kc, vc, H, K)
    x = qkv.view(N, H + 2 * K, E)
    torch.testing.assert_close(q, apply_rope(x[:, :H], cos[pos][:, None], sin[pos][:, None]))
    torch.testing.assert_close(kc[0, :, pos].transpose(0, 1), apply_rope(x[:, H:H + K], cos[pos][:, None],
                                                                         sin[pos][:, None]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,F", [(1, 176), (9, 41), (4, 5632)])
def test_silu_mul(dtype, N, F):
    gu = torch.randn(N, 2 * F, generator=torch.Generator().manual_seed(F)).to(DEVICE, dtype)
    assert rel_err(silu_mul_triton(gu), silu_mul_reference(gu)) < TOL[dtype]
