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
          dict(block_n=8, block_k=32, ahead=True), dict(block_n=4, block_k=64, split_k=2, ahead=True),
          dict(block_n=16, block_k=32, dot=True), dict(block_n=16, block_k=32, split_k=3, dot=True)]
# ahead=True: the rows kernel's tile-ahead loop (what it runs with programmatic dependent launch on Hopper)


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
@pytest.mark.parametrize("ahead", [False, True])
def test_silu_prologue_is_silu_mul_then_linear(dtype, M, N, K, ahead):
    g = torch.Generator().manual_seed(N + K)
    gu = torch.randn(M, 2 * K, generator=g).to(DEVICE, dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(DEVICE, dtype)
    y = skinny_linear_triton(gu, w, silu=True, block_n=8, block_k=32, ahead=ahead)
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
@pytest.mark.parametrize("ahead", [False, True])
def test_norm_prologue_is_add_rmsnorm_then_linear(dtype, M, N, K, with_delta, ahead):
    from kernels.gemv import norm_linear_reference, norm_linear_triton
    g = torch.Generator().manual_seed(N * K + with_delta)
    h = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    d = torch.randn(M, K, generator=g).to(DEVICE, dtype) if with_delta else None
    ln = (1 + 0.1 * torch.randn(K, generator=g)).to(DEVICE, dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(DEVICE, dtype)
    h1, y1 = norm_linear_triton(h, d, ln, 1e-5, w, block_n=8, block_k=32, ahead=ahead)
    h2, y2 = norm_linear_reference(h, d, ln, 1e-5, w)
    assert torch.equal(h1, h2)
    assert rel_err(y1, y2) < TOL[dtype]


def test_add_rmsnorm_linear_falls_back_off_one_row():
    h, d = torch.randn(3, 64), torch.randn(3, 64)
    ln, w = torch.rand(64) + 0.5, torch.randn(16, 64)
    h1, y1 = kernels.add_rmsnorm_linear(h, d, ln, w, eps=1e-6)
    h2, x2 = kernels.add_rmsnorm(h, d, ln, eps=1e-6)
    assert torch.equal(h1, h2) and torch.equal(y1, F.linear(x2, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,K,E,block_n", [(1, 4, 2, 16, 8), (2, 6, 2, 32, 4), (1, 8, 2, 64, 16), (3, 2, 2, 16, 16)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_rope_epilogue_is_norm_linear_then_rope_qkv(dtype, M, H, K, E, block_n, with_delta):
    """The q/k/v projection with RoPE and the cache writes in its epilogue: q, k and v equal
    norm_linear then rope_qkv's (the projection rounded once in between, as the two kernels store it);
    nothing else in the cache is touched."""
    from kernels.gemv import norm_linear_rope_reference, norm_linear_rope_triton
    from trunk.model import rope_tables
    D = 96
    g = torch.Generator().manual_seed(M * H + E + with_delta)
    h = torch.randn(M, D, generator=g).to(DEVICE, dtype)
    d = torch.randn(M, D, generator=g).to(DEVICE, dtype) if with_delta else None
    ln = (1 + 0.1 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    w = (0.1 * torch.randn((H + 2 * K) * E, D, generator=g)).to(DEVICE, dtype)
    cos, sin = (t.to(DEVICE, dtype) for t in rope_tables(E, 64, 10000.0))
    pos = (torch.arange(M) * 5 + 3).to(DEVICE)
    slots = (torch.arange(M) % 2).to(DEVICE, torch.int32)
    caches = [torch.full((2, K, 64, E), -7.0, device=DEVICE, dtype=dtype) for _ in range(4)]
    h1, q1 = norm_linear_rope_triton(h, d, ln, 1e-5, w, pos, slots, cos, sin, caches[0], caches[1], H, K,
                                     block_n=block_n, block_k=32)
    h2, q2 = norm_linear_rope_reference(h, d, ln, 1e-5, w, pos, slots, cos, sin, caches[2], caches[3], H, K)
    assert torch.equal(h1, h2)
    assert q1.shape == (M, H, E) and rel_err(q1, q2) < TOL[dtype]
    assert rel_err(caches[0], caches[2]) < TOL[dtype] and rel_err(caches[1], caches[3]) < TOL[dtype]
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a == -7.0, b == -7.0)  # the same cells written, no others


def test_add_rmsnorm_qkv_rope_fuses_only_one_16bit_row(monkeypatch):
    """kernels.add_rmsnorm_qkv_rope: the fused kernel for one 16-bit row (unless FAMILIAL_FUSED_ROPE=0),
    add_rmsnorm_linear then rope_qkv otherwise, with the same result."""
    import kernels.gemv as gemv
    from trunk.model import rope_tables
    monkeypatch.setenv("FAMILIAL_KERNELS", "triton")
    calls = []
    real = kernels.norm_linear_rope_triton
    monkeypatch.setattr(kernels, "norm_linear_rope_triton", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(gemv, "rows_config", lambda *a: dict(block_n=8, block_k=32))
    monkeypatch.setattr(kernels, "rows_config", lambda *a: dict(block_n=8, block_k=32))
    H, K, E, D = 4, 2, 16, 64
    w = (0.1 * torch.randn((H + 2 * K) * E, D)).to(DEVICE, torch.float16)
    ln = torch.ones(D).to(DEVICE, torch.float16)
    cos, sin = (t.to(DEVICE, torch.float16) for t in rope_tables(E, 32, 10000.0))
    outs = []
    for env, M in (("1", 1), ("0", 1), ("1", 2)):
        monkeypatch.setenv("FAMILIAL_FUSED_ROPE", env)
        torch.manual_seed(0)
        h = torch.randn(M, D).to(DEVICE, torch.float16)
        kc, vc = (torch.zeros(1, K, 32, E, device=DEVICE, dtype=torch.float16) for _ in range(2))
        pos, slots = torch.arange(M).to(DEVICE) + 4, torch.zeros(M, dtype=torch.int32, device=DEVICE)
        _, q = kernels.add_rmsnorm_qkv_rope(h, None, ln, w, pos, slots, cos, sin, kc, vc, eps=1e-6,
                                            n_heads=H, n_kv_heads=K)
        outs.append((q[0], kc[0, :, 4], vc[0, :, 4]))
    assert calls == [(1, D)]
    for a, b in zip(outs[0], outs[1]):
        assert rel_err(a, b) < TOL[torch.float16]
    for a, b in zip(outs[0], outs[2]):
        assert rel_err(a, b) < TOL[torch.float16]
