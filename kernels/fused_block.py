"""Fused pieces of a decoder block for serving (forward only): the elementwise work between the
matmuls of a block in one kernel each, so a decode step launches ~9 kernels per layer instead of ~35.

add_rmsnorm   h' = h + d (rounded to h's dtype, the residual stream);  y = w * bf(h' / sqrt(mean(h'^2) + eps))
              (d = None: h' = h). The reduction runs in fp32, the normalised row is rounded to the input
              dtype before the weight multiply: exactly trunk.model.RMSNorm's arithmetic.
rope_qkv      from packed projections qkv (N, (H + 2K) E) and each row's position p: q and k rotated by
              RoPE, q_rot = q cos_p + rotate_half(q) sin_p (same for k), with rotate_half(x1, x2) = (-x2, x1);
              q_rot is returned (N, H, E); k_rot and v are written straight into the KV cache at
              (slot_r, :, p_r, :). One rounding to the output dtype (the eager path rounds each product).
silu_mul      gu (N, 2F) = [gate | up] -> silu(gate) * up (N, F), fp32 inside, one rounding.

Each has a PyTorch reference with the same signature (`*_reference`), used on CPU and in tests.
Not here: the matmuls (cuBLAS via F.linear) and attention (attention_decode / attention_prefill).
Legend: N rows, D d_model, H/K query/kv heads, E head dim, F d_ff, S cache positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import jit, next_pow2, pdl, tl


# ---- add_rmsnorm -----------------------------------------------------------------------------------
@jit(default=dict(num_warps=4), interpret_default=dict())
def _add_rmsnorm_kernel(H_IN, D_IN, W, H_OUT, Y, s_h, s_d, s_ho, s_y, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    h = tl.load(H_IN + row * s_h + offs, mask=ok, other=0.0)
    if HAS_D:
        h = (h.to(tl.float32) + tl.load(D_IN + row * s_d + offs, mask=ok, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(H_OUT + row * s_ho + offs, h, mask=ok)
    x = h.to(tl.float32)
    r = tl.math.rsqrt(tl.sum(x * x, 0) / D + eps)
    n = (x * r).to(h.dtype).to(tl.float32)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, (n * w).to(Y.dtype.element_ty), mask=ok)


def add_rmsnorm_triton(h, d, w, eps: float):
    N, D = h.shape
    y = torch.empty_like(h)
    h_out = torch.empty_like(h) if d is not None else h
    if N:
        _add_rmsnorm_kernel[(N,)](h, d if d is not None else h, w, h_out, y, h.stride(0),
                                  (d if d is not None else h).stride(0), h_out.stride(0), y.stride(0), float(eps),
                                  D=D, BLOCK=next_pow2(D), HAS_D=d is not None)
    return h_out, y


def add_rmsnorm_reference(h, d, w, eps: float):
    if d is not None:
        h = h + d
    x32 = h.float()
    n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return h, w * n


# ---- rope_qkv --------------------------------------------------------------------------------------
@jit(default=dict(num_warps=4), interpret_default=dict())
def _rope_qkv_kernel(QKV, POS, SLOTS, COS, SIN, Q_OUT, KC, VC, s_row, s_cos, s_qn, s_qh,
                     s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                     H: tl.constexpr, K: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if PDL:  # kernels.backend.pdl: let the attention launch now, read qkv once its kernel has finished
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    p = tl.load(POS + row).to(tl.int64)
    slot = tl.load(SLOTS + row).to(tl.int64)
    e = tl.arange(0, E)
    half: tl.constexpr = E // 2
    partner = tl.where(e < half, e + half, e - half)
    sign = tl.where(e < half, -1.0, 1.0)
    cos = tl.load(COS + p * s_cos + e).to(tl.float32)
    sin = tl.load(SIN + p * s_cos + e).to(tl.float32)
    hh = tl.arange(0, BLOCK_H)
    base = QKV + row * s_row
    # q heads
    okq = (hh < H)[:, None]
    xq = tl.load(base + hh[:, None] * E + e[None, :], mask=okq, other=0.0).to(tl.float32)
    pq = tl.load(base + hh[:, None] * E + partner[None, :], mask=okq, other=0.0).to(tl.float32)
    q = xq * cos[None, :] + sign[None, :] * pq * sin[None, :]
    tl.store(Q_OUT + row * s_qn + hh[:, None] * s_qh + e[None, :], q.to(Q_OUT.dtype.element_ty), mask=okq)
    # k heads (rotated) and v heads, straight into the cache at (slot, head, p)
    okk = (hh < K)[:, None]
    xk = tl.load(base + (H + hh[:, None]) * E + e[None, :], mask=okk, other=0.0).to(tl.float32)
    pk = tl.load(base + (H + hh[:, None]) * E + partner[None, :], mask=okk, other=0.0).to(tl.float32)
    k = xk * cos[None, :] + sign[None, :] * pk * sin[None, :]
    tl.store(KC + slot * s_kb + hh[:, None] * s_kh + p * s_kt + e[None, :], k.to(KC.dtype.element_ty), mask=okk)
    v = tl.load(base + (H + K + hh[:, None]) * E + e[None, :], mask=okk, other=0.0)
    tl.store(VC + slot * s_vb + hh[:, None] * s_vh + p * s_vt + e[None, :], v.to(VC.dtype.element_ty), mask=okk)


def rope_qkv_triton(qkv, pos, slots, cos, sin, k_cache, v_cache, H: int, K: int):
    """qkv (N, (H+2K)E) rows, pos/slots (N,) int; cos/sin (P, E); caches (B_cache, K, S, E). -> q (N, H, E)."""
    N = qkv.shape[0]
    E = k_cache.shape[-1]
    q = torch.empty(N, H, E, dtype=qkv.dtype, device=qkv.device)
    if N:
        _rope_qkv_kernel[(N,)](qkv, pos, slots, cos, sin, q, k_cache, v_cache, qkv.stride(0), cos.stride(0),
                               q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                               H=H, K=K, E=E, BLOCK_H=next_pow2(max(H, K)), **pdl(qkv, "attention"))
    return q


def rope_qkv_reference(qkv, pos, slots, cos, sin, k_cache, v_cache, H: int, K: int):
    N = qkv.shape[0]
    E = k_cache.shape[-1]
    x = qkv.view(N, H + 2 * K, E).float()
    c, s = cos[pos].float()[:, None], sin[pos].float()[:, None]   # (N, 1, E)
    x1, x2 = x.chunk(2, dim=-1)
    rot = x * c + torch.cat((-x2, x1), dim=-1) * s
    q = rot[:, :H].to(qkv.dtype)
    k_cache[slots.long(), :, pos.long()] = rot[:, H:H + K].to(k_cache.dtype)
    v_cache[slots.long(), :, pos.long()] = x[:, H + K:].to(v_cache.dtype)
    return q


# ---- silu_mul --------------------------------------------------------------------------------------
@jit(default=dict(BLOCK=1024, num_warps=4), interpret_default=dict(BLOCK=256))
def _silu_mul_kernel(GU, OUT, s_gu, s_o, F_: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F_
    g = tl.load(GU + row * s_gu + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_gu + F_ + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * s_o + offs, (g / (1.0 + tl.exp(-g)) * u).to(OUT.dtype.element_ty), mask=ok)


def silu_mul_triton(gu):
    N, F2 = gu.shape
    Fd = F2 // 2
    out = torch.empty(N, Fd, dtype=gu.dtype, device=gu.device)
    if N:
        meta = _silu_mul_kernel.meta()
        _silu_mul_kernel[(N, -(-Fd // meta["BLOCK"]))](gu, out, gu.stride(0), out.stride(0), F_=Fd)
    return out


def silu_mul_reference(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u
