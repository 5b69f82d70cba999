"""Skinny linear layers for decode: y (M, N) = x (M, K) @ W (N, K)^T with M small (1..16 rows).

At batch 1 a decode step is a chain of matrix-vector products, bound by reading W once from HBM. cuBLAS
reaches 0.9-2.3 TB/s of the H200's 4.2 on the `1b` block's shapes (benchmarks/results/
engine_throughput_h200.json, section `anatomy`), so a step takes twice its roofline. Here every program
streams a (BLOCK_N, BLOCK_K) tile of W per iteration and reduces it against the rows of x in fp32:

  rows kernel   grid (N / BLOCK_N, SPLIT_K, M): one row of x per program (W re-read per row, from L2).
                Optional prologues, so the block needs no elementwise kernel between its matmuls:
                SILU  x is [gate | up] (M, 2K) and the row is silu(gate) * up (the down projection);
                NORM  x is add_rmsnorm(h, d) (the q/k/v and gate/up projections): each program first
                      reduces the row's sum of squares (the row is 4 KB, read from L2), program 0
                      stores the residual h + d.
  dot kernel    grid (N / BLOCK_N, SPLIT_K): every row of x at once through tl.dot (M padded to 16).
SPLIT_K > 1 adds fp32 partial sums with atomics into a zeroed fp32 output (the caller rounds it).
AHEAD loads each W tile one iteration ahead, the first before anything else; with PDL (Hopper,
kernels.backend.pdl) the kernel then lets the next kernel launch and waits for the previous kernel's
writes before it touches x, so consecutive matmuls of a decode step overlap their start-up and tail
instead of leaving HBM idle between kernels.

Reference: `skinny_linear_reference` (F.linear, and silu(gate) * up first for SILU). Forward only.
Legend: M rows, N outputs, K inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import jit, pdl, tl


@jit(default=dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4, num_stages=1), interpret_default=dict(BLOCK_N=8, BLOCK_K=64))
def _rows_kernel(X, W, Y, D_IN, LNW, H_OUT, N, K, s_xm, s_wn, s_ym, s_dm, s_hm, eps,
                 POS, SLOTS, COS, SIN, KC, VC, s_cos, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SILU: tl.constexpr,
                 NORM: tl.constexpr, HAS_D: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr, AHEAD: tl.constexpr,
                 ROPE: tl.constexpr = False, E: tl.constexpr = 64, NH: tl.constexpr = 1, NKV: tl.constexpr = 1):
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    if ROPE:  # W is [q | k | v] heads of E rows: a program takes HB dims of one head and their RoPE partners
        HB: tl.constexpr = BLOCK_N // 2
        head = pid_n // (E // BLOCK_N)
        t = tl.arange(0, BLOCK_N)
        dim = tl.where(t < HB, 0, E // 2 - HB) + (pid_n % (E // BLOCK_N)) * HB + t
        rn = head * E + dim
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk0 = tl.arange(0, BLOCK_K)
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    lo = pid_k * span
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    w_ptr = W + rn[:, None].to(tl.int64) * s_wn
    x_ptr = X + m * s_xm
    r = 0.0
    if AHEAD:  # W is no earlier kernel's output: its first tile streams in while the previous kernel ends
        if EVEN:
            w = tl.load(w_ptr + (lo + rk0)[None, :])
        else:
            w = tl.load(w_ptr + (lo + rk0)[None, :], mask=(rn < N)[:, None] & ((lo + rk0) < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if NORM:  # x = add_rmsnorm(h, d): the residual h' = round(h + d) (program 0 stores it), then 1/rms(h')
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        first = (pid_n == 0) & (pid_k == 0)
        for k in range(0, K, BLOCK_K):
            rk = k + rk0
            ok = rk < K
            hv = tl.load(x_ptr + rk, mask=ok, other=0.0)
            if HAS_D:
                hv = (hv.to(tl.float32) + tl.load(D_IN + m * s_dm + rk, mask=ok, other=0.0).to(tl.float32)).to(hv.dtype)
                if first:
                    tl.store(H_OUT + m * s_hm + rk, hv, mask=ok)
            hf = hv.to(tl.float32)
            ss += hf * hf
        r = tl.math.rsqrt(tl.sum(ss, 0) / K + eps)
    for k in range(lo, lo + span, BLOCK_K):
        rk = k + rk0
        ok = rk < K
        if not AHEAD:  # (AHEAD: w is this tile already, loaded one iteration ahead)
            if EVEN:
                w = tl.load(w_ptr + rk[None, :])
            else:
                w = tl.load(w_ptr + rk[None, :], mask=(rn < N)[:, None] & ok[None, :], other=0.0)
        if SILU:
            g = tl.load(x_ptr + rk, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + rk, mask=ok, other=0.0).to(tl.float32)
            x = (g / (1.0 + tl.exp(-g)) * u).to(W.dtype.element_ty).to(tl.float32)
        elif NORM:
            hv = tl.load(x_ptr + rk, mask=ok, other=0.0)
            if HAS_D:
                hv = (hv.to(tl.float32) + tl.load(D_IN + m * s_dm + rk, mask=ok, other=0.0).to(tl.float32)).to(hv.dtype)
            n = (hv.to(tl.float32) * r).to(hv.dtype).to(tl.float32)
            lw = tl.load(LNW + rk, mask=ok, other=0.0).to(tl.float32)
            x = (n * lw).to(W.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(x_ptr + rk, mask=ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if AHEAD:  # the next tile (masked off after the last)
            nk = rk + BLOCK_K
            w = tl.load(w_ptr + nk[None, :], mask=(rn < N)[:, None] & ((nk < K) & (nk < lo + span))[None, :], other=0.0)
    y = tl.sum(acc, 1)
    out = Y + m * s_ym + rn
    if ROPE:  # kernels/fused_block.py's rope_qkv on the rounded outputs: q to Y, k and v into the cache
        yv = y.to(Y.dtype.element_ty).to(tl.float32)
        pos = tl.load(POS + m).to(tl.int64)
        slot = tl.load(SLOTS + m).to(tl.int64)
        if head < NH + NKV:
            halves = tl.reshape(yv, [2, HB])
            r2 = tl.arange(0, 2)[:, None]
            lo_ = tl.sum(tl.where(r2 == 0, halves, 0.0), 0)
            hi_ = tl.sum(tl.where(r2 == 1, halves, 0.0), 0)
            partner = tl.reshape(tl.where(r2 == 0, hi_[None, :], lo_[None, :]), [BLOCK_N])
            sign = tl.where(t < HB, -1.0, 1.0)
            cos = tl.load(COS + pos * s_cos + dim).to(tl.float32)
            sin = tl.load(SIN + pos * s_cos + dim).to(tl.float32)
            rot = yv * cos + sign * partner * sin
            if head < NH:
                tl.store(out, rot.to(Y.dtype.element_ty))
            else:
                tl.store(KC + slot * s_kb + (head - NH) * s_kh + pos * s_kt + dim, rot.to(KC.dtype.element_ty))
        else:
            tl.store(VC + slot * s_vb + (head - NH - NKV) * s_vh + pos * s_vt + dim, yv.to(VC.dtype.element_ty))
    elif SPLIT_K == 1:
        tl.store(out, y.to(Y.dtype.element_ty), mask=rn < N)
    else:
        tl.atomic_add(out, y, mask=rn < N)


@jit(default=dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4), interpret_default=dict(BLOCK_N=16, BLOCK_K=32))
def _dot_kernel(X, W, Y, M, N, K, s_xm, s_wn, s_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk0 = tl.arange(0, BLOCK_K)
    span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    lo = pid_k * span
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_ptr = W + rn[:, None].to(tl.int64) * s_wn
    for k in range(lo, lo + span, BLOCK_K):
        rk = k + rk0
        x = tl.load(X + rm[:, None] * s_xm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        if EVEN:
            w = tl.load(w_ptr + rk[None, :])
        else:
            w = tl.load(w_ptr + rk[None, :], mask=(rn < N)[:, None] & (rk < K)[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PREC)
    out = Y + rm[:, None] * s_ym + rn[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(Y.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out, acc, mask=ok)


def skinny_linear_reference(x, w, silu: bool = False):
    if silu:
        g, u = x.chunk(2, dim=-1)
        x = F.silu(g) * u
    return F.linear(x, w)


_NO_ROPE = (None,) * 6 + (0,) * 7  # the ROPE epilogue's pointers and strides, unused


def _launch(t, ahead: bool | None) -> dict:
    """PDL launch arguments (kernels.backend.pdl) plus AHEAD: on with PDL unless `ahead` says."""
    kw = pdl(t)
    kw["AHEAD"] = kw["PDL"] if ahead is None else ahead
    return kw


def skinny_linear_triton(x, w, *, silu: bool = False, block_n: int = 16, block_k: int = 512, split_k: int = 1,
                         num_warps: int = 4, num_stages: int = 2, dot: bool = False, ahead: bool | None = None):
    """y = x @ w^T (silu: x = [gate | up] -> silu(gate) * up first), with explicit launch parameters."""
    M, Kx = x.shape
    N, K = w.shape
    if Kx != (2 * K if silu else K) or x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} does not match w {tuple(w.shape)} (silu={silu})")
    y = (torch.zeros if split_k > 1 else torch.empty)(M, N, device=x.device,
                                                      dtype=torch.float32 if split_k > 1 else x.dtype)
    even = N % block_n == 0 and K % (block_k * split_k) == 0
    meta = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    if dot:
        if silu:
            raise ValueError("skinny_linear: the dot kernel has no SILU prologue")
        _dot_kernel[(N // block_n + (N % block_n > 0), split_k)](
            x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=max(16, 1 << (M - 1).bit_length()),
            SPLIT_K=split_k, EVEN=even, PREC="ieee" if x.dtype == torch.float32 else "tf32", meta=meta)
    else:
        _rows_kernel[(N // block_n + (N % block_n > 0), split_k, M)](
            x, w, y, x, x, x, N, K, x.stride(0), w.stride(0), y.stride(0), 0, 0, 0.0, *_NO_ROPE, SPLIT_K=split_k, SILU=silu,
            NORM=False, HAS_D=False, EVEN=even, meta=meta, **_launch(x, ahead))
    return y if split_k == 1 else y.to(x.dtype)


def norm_linear_triton(h, d, ln_w, eps: float, w, *, block_n: int = 8, block_k: int = 1024, num_warps: int = 4,
                       num_stages: int = 1, ahead: bool | None = None):
    """add_rmsnorm then a linear layer in one kernel: (h + d, bf(bf(h' / rms(h')) * ln_w) @ w^T), the
    normalised rows made on the fly by every program (kernels/fused_block.py's arithmetic exactly)."""
    M, K = h.shape
    N = w.shape[0]
    if w.shape[1] != K or h.stride(-1) != 1 or w.stride(-1) != 1 or (d is not None and d.shape != h.shape):
        raise ValueError(f"norm_linear: h {tuple(h.shape)} does not match w {tuple(w.shape)}")
    y = torch.empty(M, N, device=h.device, dtype=h.dtype)
    h_out = torch.empty_like(h) if d is not None else h
    dd = d if d is not None else h
    _rows_kernel[(N // block_n + (N % block_n > 0), 1, M)](
        h, w, y, dd, ln_w, h_out, N, K, h.stride(0), w.stride(0), y.stride(0), dd.stride(0), h_out.stride(0),
        float(eps), *_NO_ROPE, SPLIT_K=1, SILU=False, NORM=True, HAS_D=d is not None, EVEN=N % block_n == 0 and K % block_k == 0,
        meta=dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages), **_launch(h, ahead))
    return h_out, y


def norm_linear_rope_triton(h, d, ln_w, eps: float, w, pos, slots, cos, sin, k_cache, v_cache, H: int, K: int, *,
                            block_n: int = 8, block_k: int = 1024, num_warps: int = 4, num_stages: int = 1,
                            ahead: bool | None = None):
    """add_rmsnorm, the q/k/v projection and rope_qkv in one kernel (one row per program row m):
    returns (h + d, q (M, H, E)); k and v go into the caches at (slots[m], pos[m]). Each program reads
    block_n // 2 dims of one head and the dims E/2 further on (their RoPE partners), so no weight is
    copied or permuted; the arithmetic is norm_linear's then rope_qkv's, rounding in between."""
    M, Kd = h.shape
    E = k_cache.shape[-1]
    if (w.shape != ((H + 2 * K) * E, Kd) or E % block_n or block_n % 2 or h.stride(-1) != 1 or not w.is_contiguous()
            or (d is not None and d.shape != h.shape) or cos.stride(-1) != 1 or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1):
        raise ValueError(f"norm_linear_rope: h {tuple(h.shape)}, w {tuple(w.shape)}, {H}+2x{K} heads of {E}, "
                         f"block_n {block_n}")
    q = torch.empty(M, H, E, device=h.device, dtype=h.dtype)
    h_out = torch.empty_like(h) if d is not None else h
    dd = d if d is not None else h
    N = w.shape[0]
    _rows_kernel[(N // block_n, 1, M)](
        h, w, q, dd, ln_w, h_out, N, Kd, h.stride(0), w.stride(0), q.stride(0), dd.stride(0), h_out.stride(0),
        float(eps), pos, slots, cos, sin, k_cache, v_cache, cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), SPLIT_K=1, SILU=False, NORM=True,
        HAS_D=d is not None, EVEN=Kd % block_k == 0, ROPE=True, E=E, NH=H, NKV=K,
        meta=dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages), **_launch(h, ahead))
    return h_out, q


def norm_linear_rope_reference(h, d, ln_w, eps: float, w, pos, slots, cos, sin, k_cache, v_cache, H: int, K: int):
    from kernels.fused_block import rope_qkv_reference
    h, qkv = norm_linear_reference(h, d, ln_w, eps, w)
    return h, rope_qkv_reference(qkv, pos, slots, cos, sin, k_cache, v_cache, H, K)


def norm_linear_reference(h, d, ln_w, eps: float, w):
    from kernels.fused_block import add_rmsnorm_reference
    h, x = add_rmsnorm_reference(h, d, ln_w, eps)
    return h, F.linear(x, w)


def rows_config(N: int, K: int, silu: bool) -> dict:
    """Launch parameters of the rows kernel at one row, from benchmarks/results/kernels_gemv.json (H200,
    weights read from HBM): 8 x 1024 tiles for 2-10 MB weights, 16 x 256 for the wide gate/up,
    4 x 512 for a long K (the down projection), 8 x 1024 when the SiLU prologue reads [gate | up]."""
    if silu:
        return dict(block_n=8, block_k=1024, num_stages=3)
    if N >= 8192:
        return dict(block_n=16, block_k=256, num_stages=1)
    if K > 4096:
        return dict(block_n=4, block_k=512, num_stages=1)
    return dict(block_n=8, block_k=1024, num_stages=1)
