"""Skinny linear kernels (kernels/gemv.py) against F.linear: the rows kernel (plain and with its SiLU
prologue) and the dot kernel, split-K or not, odd shapes (interpreter on CPU, native on GPU); and
kernels.linear_1row's choice between the kernel and F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.fused_block import silu_mul_reference
from kernels.gemv import rows_config, skinny_linear_reference, skinny_linear_triton
from ktest import DEVICE, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LAUNCH = [dict(block_n=8, block_k=32), dict(block_n=4, block_k=64, split_k=2),
          dict(block_n=16, block_k=32, dot=True), dict(block_n=16, block_k=32, split_k=3, dot=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 48, 64), (3, 50, 96), (2, 37, 200)])
@pytest.mark.parametrize("launch", LAUNCH, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_skinny_linear_matches_f_linear(dtype, M, N, K, launch):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(DEVICE, dtype)
    y = skinny_linear_triton(x, w, **launch)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, F.linear(x.float(), w.float())) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 40, 64), (2, 24, 100)])
def test_silu_prologue_is_silu_mul_then_linear(dtype, M, N, K):
    g = torch.Generator().manual_seed(N + K)
    gu = torch.randn(M, 2 * K, generator=g).to(DEVICE, dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(DEVICE, dtype)
    y = skinny_linear_triton(gu, w, silu=True, block_n=8, block_k=32)
    ref = F.linear(silu_mul_reference(gu), w)
    assert rel_err(y, ref) < TOL[dtype]
    assert torch.equal(skinny_linear_reference(gu, w, silu=True), ref)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        skinny_linear_triton(torch.randn(1, 10), torch.randn(4, 12))


def test_rows_config_covers_the_block_shapes():
    for N, K, silu in [(2560, 2048, False), (2048, 2048, False), (11264, 2048, False), (2048, 5632, True),
                       (2048, 5632, False), (32000, 2048, False)]:
        c = rows_config(N, K, silu)
        assert c["block_n"] in (4, 8, 16) and c["block_k"] in (256, 512, 1024)


def test_linear_1row_uses_the_kernel_only_for_one_16bit_row(monkeypatch):
    monkeypatch.setenv("FAMILIAL_KERNELS", "triton")
    calls = []
    real = kernels.skinny_linear_triton
    monkeypatch.setattr(kernels, "skinny_linear_triton", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    w = (0.1 * torch.randn(24, 1024)).to(DEVICE, torch.float16)
    one = torch.randn(1, 1024).to(DEVICE, torch.float16)
    assert rel_err(kernels.linear_1row(one, w), F.linear(one.float(), w.float())) < TOL[torch.float16]
    kernels.linear_1row(torch.randn(3, 1024).to(DEVICE, torch.float16), w)       # 3 rows: F.linear
    kernels.linear_1row(torch.randn(1, 1024).to(DEVICE), w.float())              # fp32: F.linear
    assert calls == [(1, 1024)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 40, 64), (1, 33, 200), (2, 24, 96)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_norm_prologue_is_add_rmsnorm_then_linear(dtype, M, N, K, with_delta):
    from kernels.gemv import norm_linear_reference, norm_linear_triton
    g = torch.Generator().manual_seed(N * K + with_delta)
    h = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    d = torch.randn(M, K, generator=g).to(DEVICE, dtype) if with_delta else None
    ln = (1 + 0.1 * torch.randn(K, generator=g)).to(DEVICE, dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(DEVICE, dtype)
    h1, y1 = norm_linear_triton(h, d, ln, 1e-5, w, block_n=8, block_k=32)
    h2, y2 = norm_linear_reference(h, d, ln, 1e-5, w)
    assert torch.equal(h1, h2)
    assert rel_err(y1, y2) < TOL[dtype]


def test_add_rmsnorm_linear_falls_back_off_one_row():
    h, d = torch.randn(3, 64), torch.randn(3, 64)
    ln, w = torch.rand(64) + 0.5, torch.randn(16, 64)
    h1, y1 = kernels.add_rmsnorm_linear(h, d, ln, w, eps=1e-6)
    h2, x2 = kernels.add_rmsnorm(h, d, ln, eps=1e-6)
    assert torch.equal(h1, h2) and torch.equal(y1, F.linear(x2, w))
