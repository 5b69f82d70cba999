"""Fused exit head: RMSNorm -> x W^T -> softmax statistics over the vocabulary, never writing logits.

Per row r with hidden h_r (H,), norm weight w (H,), unembedding W (V, H):
    x_r   = w * bf(h_r / sqrt(mean(h_r^2) + eps))        (trunk's RMSNorm, reduction in fp32)
    z_rv  = x_r . W_v                                    (fp32 accumulation, never stored)
    lse_r = log sum_v e^{z_rv}
    token_r = argmax_v z_rv,   max_prob_r = e^{z_r,token - lse_r}
    entropy_r = -sum_v p_rv log p_rv = lse_r - sum_v p_rv z_rv,   p = softmax(z)
    sampled_r = argmax_v (z_rv / T + g_rv)   (Gumbel-max: a draw from softmax(z / T); T = 0: token)
with g_rv = -log(-log u_rv), u_rv a counter-based hash of (row seed, v) mapped into (0, 1), the same
function in the kernel and the reference, so the two sample the same token.

Online statistics over vocabulary tiles (running max m, s = sum e^{z-m}, t = sum e^{z-m} z):
    m' = max(m, max_tile z);  s' = s e^{m-m'} + sum_tile e^{z-m'};  t' = t e^{m-m'} + sum_tile e^{z-m'} z
and the same merge combines the vocabulary splits:  lse = M + log S,  entropy = lse - T / S.

Work split: the vocabulary is cut into P splits; a program owns (row block, split) and walks the
split's tiles. Decode rows (<= 64): one row block, P ~ 2 x SMs splits, so the weight streams from HBM
once across the whole GPU. More rows: 128-row blocks, fewer splits, programs grouped so that
concurrent ones share row blocks and weight tiles in L2 (the usual matmul "GROUP_M" order).
Temporaries: the normalised rows (N x H) and the split partials (N x P x 6 values), not N x V.

Not here: choosing an exit from these statistics (serving's policy does that) and top-k/top-p.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.backend import config, jit, next_pow2, num_sms, tl


class ExitHeadOut(NamedTuple):
    token: torch.Tensor     # (...,) int64 argmax
    max_prob: torch.Tensor  # (...,) fp32 softmax probability of `token`
    entropy: torch.Tensor   # (...,) fp32 in nats
    lse: torch.Tensor       # (...,) fp32 logsumexp of the logits
    sampled: torch.Tensor   # (...,) int64 Gumbel-max draw at `temperature` (== token where T == 0)


SMALL_ROWS = 64
_SMALL_GRAN = 128  # split sizes are multiples of every small config's BLOCK_V
_LARGE_GRAN = 256

_SMALL_CONFIGS = [  # BLOCK_V divides _SMALL_GRAN
    config(BLOCK_V=64, BLOCK_K=256, num_warps=4, num_stages=3),
    config(BLOCK_V=128, BLOCK_K=128, num_warps=4, num_stages=3),
    config(BLOCK_V=64, BLOCK_K=128, num_warps=4, num_stages=4),
    config(BLOCK_V=128, BLOCK_K=256, num_warps=8, num_stages=2),
    config(BLOCK_V=64, BLOCK_K=512, num_warps=4, num_stages=2),
]
_LARGE_CONFIGS = [  # BLOCK_M = 128 (the split sizing assumes it); BLOCK_V divides _LARGE_GRAN
    config(BLOCK_M=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),
    config(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
    config(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=4, num_stages=4),
    config(BLOCK_M=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=4),
    config(BLOCK_M=128, BLOCK_V=128, BLOCK_K=128, num_warps=8, num_stages=3),
]


@jit(default=dict(num_warps=4), interpret_default=dict())
def _rmsnorm_kernel(X, NW, Y, sx, sy, eps, H: tl.constexpr, BLOCK_H: tl.constexpr):
    # y = w * bf(x * rsqrt(mean(x^2) + eps)): the cast back to x's dtype before the weight is what
    # HF Llama/Qwen2 (and trunk.model.RMSNorm) do, so logits match the unfused model bit-for-bit.
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_H)
    x = tl.load(X + row * sx + d, mask=d < H, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / H + eps)
    n = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(NW + d, mask=d < H, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + d, (n * w).to(Y.dtype.element_ty), mask=d < H)


def _partial_kernel_fn(
    XN, W, SEEDS, INV_T, PM, PS, PT, PBEST, PARG, PGBEST, PGARG,
    N, V, sxn, sw, SPLIT_SIZE, N_SPLITS, N_BUCKET,
    H: tl.constexpr, SAMPLE: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program -> (row block, vocabulary split), grouped: GROUP_M row blocks x all splits in a row.
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_M)
    width = GROUP_M * N_SPLITS
    first_rb = (pid // width) * GROUP_M
    gsize = tl.minimum(n_rb - first_rb, GROUP_M)
    rb = first_rb + (pid % width) % gsize
    sp = (pid % width) // gsize

    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)  # clamped: no masks in the k loop
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = XN + rows_c[:, None] * sxn + offs_k[None, :]
    if SAMPLE:
        seed = tl.load(SEEDS + rows_c).to(tl.uint32, bitcast=True)
        inv_t = tl.load(INV_T + rows_c)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_M], tl.int32)
    gbest = tl.full([BLOCK_M], float("-inf"), tl.float32)
    garg = tl.zeros([BLOCK_M], tl.int32)

    v_lo = sp * SPLIT_SIZE
    v_hi = tl.minimum(v_lo + SPLIT_SIZE, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        w_ptrs = W + tl.minimum(cols, V - 1).to(tl.int64)[:, None] * sw + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            if H % BLOCK_K == 0:
                a = tl.load(a_ptrs + k0)
                w = tl.load(w_ptrs + k0)
            else:
                kmask = (k0 + offs_k) < H
                a = tl.load(a_ptrs + k0, mask=kmask[None, :], other=0.0)
                w = tl.load(w_ptrs + k0, mask=kmask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)

        valid = (cols < V)[None, :]
        z = tl.where(valid, acc, float("-inf"))
        tmax = tl.max(z, 1)
        targ = tl.argmax(z, 1)  # first index among ties, like torch.argmax
        m_new = tl.maximum(m, tmax)  # finite: every tile has a valid column
        e = tl.exp(z - m_new[:, None])
        scale = tl.exp(m - m_new)
        s = s * scale + tl.sum(e, 1)
        t = t * scale + tl.sum(e * tl.where(valid, acc, 0.0), 1)  # e = 0 off the vocabulary
        m = m_new
        upd = tmax > best  # strict: keep the earlier tile on ties
        best = tl.where(upd, tmax, best)
        arg = tl.where(upd, v0 + targ, arg)
        if SAMPLE:
            # lowbias32 hash of (seed, column) -> u in (0, 1) -> Gumbel noise
            x = cols.to(tl.uint32)[None, :] * 0x9E3779B1 + seed[:, None]
            x = x ^ (x >> 16)
            x = x * 0x7FEB352D
            x = x ^ (x >> 15)
            x = x * 0x846CA68B
            x = x ^ (x >> 16)
            u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            y = tl.where(valid, acc * inv_t[:, None] - tl.log(-tl.log(u)), float("-inf"))
            ymax = tl.max(y, 1)
            yarg = tl.argmax(y, 1)
            gupd = ymax > gbest
            gbest = tl.where(gupd, ymax, gbest)
            garg = tl.where(gupd, v0 + yarg, garg)

    out = rows.to(tl.int64) * N_SPLITS + sp
    ok = rows < N
    tl.store(PM + out, m, mask=ok)
    tl.store(PS + out, s, mask=ok)
    tl.store(PT + out, t, mask=ok)
    tl.store(PBEST + out, best, mask=ok)
    tl.store(PARG + out, arg, mask=ok)
    if SAMPLE:
        tl.store(PGBEST + out, gbest, mask=ok)
        tl.store(PGARG + out, garg, mask=ok)


_KEY = ["N_BUCKET", "H", "V", "SAMPLE"]
_partial_small = jit(configs=_SMALL_CONFIGS, key=_KEY,
                     default=dict(BLOCK_V=64, BLOCK_K=256, num_warps=4, num_stages=3),
                     interpret_default=dict(BLOCK_V=64, BLOCK_K=64))(_partial_kernel_fn)
_partial_large = jit(configs=_LARGE_CONFIGS, key=_KEY,
                     default=dict(BLOCK_M=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),
                     interpret_default=dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=64))(_partial_kernel_fn)


@jit(default=dict(num_warps=4), interpret_default=dict())
def _combine_kernel(
    PM, PS, PT, PBEST, PARG, PGBEST, PGARG, INV_T, TOKEN, MAXP, ENT, LSE, SAMPLED,
    N_SPLITS, SAMPLE: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS_P2)
    ok = sp < N_SPLITS
    idx = row * N_SPLITS + sp
    m = tl.load(PM + idx, mask=ok, other=float("-inf"))
    s = tl.load(PS + idx, mask=ok, other=0.0)
    t = tl.load(PT + idx, mask=ok, other=0.0)
    M = tl.max(m, 0)
    w = tl.exp(m - M)  # empty splits: m = -inf -> 0
    S = tl.sum(s * w, 0)
    T = tl.sum(t * w, 0)
    lse = M + tl.log(S)
    best = tl.load(PBEST + idx, mask=ok, other=float("-inf"))
    arg = tl.load(PARG + idx, mask=ok, other=0)
    bmax = tl.max(best, 0)
    first = tl.argmax(best, 0)  # lowest split among ties = lowest vocabulary index
    token = tl.sum(tl.where(sp == first, arg, 0), 0)
    tl.store(TOKEN + row, token.to(tl.int64))
    tl.store(MAXP + row, tl.exp(bmax - lse))
    tl.store(ENT + row, lse - T / S)
    tl.store(LSE + row, lse)
    if SAMPLE:
        gb = tl.load(PGBEST + idx, mask=ok, other=float("-inf"))
        ga = tl.load(PGARG + idx, mask=ok, other=0)
        gfirst = tl.argmax(gb, 0)
        drawn = tl.sum(tl.where(sp == gfirst, ga, 0), 0)
        greedy = tl.load(INV_T + row) == 0.0  # temperature 0: the argmax
        tl.store(SAMPLED + row, tl.where(greedy, token, drawn).to(tl.int64))


# ---- seeds and noise shared with the reference -----------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow (split c in 16-bit halves)."""
    return ((x * (c & 0xFFFF)) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_seeds(seed, n_rows: int, device) -> torch.Tensor:
    """Per-row 32-bit seeds as int64 in [0, 2^32).

    seed: None (drawn from torch's generator), an int (row r uses hash(seed, r)), or an (N,) int
    tensor of per-request seeds used as given, so a request samples the same way whatever batch it
    is in; mix the decode step into it (seed + step) so successive steps draw fresh noise.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=device, dtype=torch.int64).reshape(-1)
        if s.numel() != n_rows:
            raise ValueError(f"seed tensor has {s.numel()} entries for {n_rows} rows")
        return _lowbias32(s & _M32)
    r = torch.arange(n_rows, device=device, dtype=torch.int64)
    return _lowbias32((_lowbias32(torch.full_like(r, int(seed) & _M32)) + _mul32(r, 0x9E3779B1)) & _M32)


def gumbel_noise(seeds_N: torch.Tensor, V: int) -> torch.Tensor:
    """(N, V) Gumbel noise, the same function of (seed, column) as the kernel computes."""
    cols = torch.arange(V, device=seeds_N.device, dtype=torch.int64)
    x = (_mul32(cols, 0x9E3779B1)[None, :] + seeds_N[:, None]) & _M32
    x = _lowbias32(x)
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def _inv_temperature(temperature, n_rows, device) -> torch.Tensor:
    """Per-row 1/T as fp32, 0 marking rows with T <= 0 (they take the argmax). No host sync."""
    if not isinstance(temperature, torch.Tensor):
        t = float(temperature)
        return torch.full((n_rows,), 1.0 / t if t > 0 else 0.0, device=device)
    t = temperature.to(device=device, dtype=torch.float32).reshape(-1).expand(n_rows)
    return torch.where(t > 0, 1.0 / t.clamp_min(1e-6), torch.zeros_like(t))


def _as_rows(h):
    H = h.shape[-1]
    return h.reshape(-1, H), h.shape[:-1]


# ---- launcher --------------------------------------------------------------------------------------

def _splits(n_rows: int, V: int, block_m: int, gran: int, device) -> tuple[int, int]:
    """(split size, number of splits). Programs are short (a few vocabulary tiles each) and many
    (~8 per SM), so the last wave is a small fraction of the run; split sizes are multiples of
    `gran` so that every config's BLOCK_V divides them."""
    n_rb = -(-n_rows // block_m)
    want = max(1, -(-8 * num_sms(device) // n_rb))
    size = -(-V // want)
    size = -(-size // gran) * gran
    return size, -(-V // size)


def exit_head_triton(h, norm_weight, W, *, eps, temperature=0.0, seed=None):
    """Triton fused exit head; same signature and result as `exit_head_reference`.

    Host work is kept to allocations and launches (no device syncs): a decode step can be captured
    in a CUDA graph. A tensor `temperature` always takes the sampling path (rows with T = 0 return
    the argmax), so its values never have to be read on the host.
    """
    x, lead = _as_rows(h)
    N, H = x.shape
    V = W.shape[0]
    if W.shape[1] != H or W.stride(-1) != 1:
        raise ValueError(f"W must be (V, {H}) with contiguous rows, got {tuple(W.shape)}")
    dev = x.device
    x = x if x.stride(-1) == 1 else x.contiguous()
    token = torch.empty(N, dtype=torch.int64, device=dev)
    stats = torch.empty(3, N, device=dev)  # max_prob, entropy, lse
    sample = isinstance(temperature, torch.Tensor) or float(temperature) > 0
    sampled = torch.empty(N, dtype=torch.int64, device=dev) if sample else token
    if N == 0:
        return ExitHeadOut(*(o.reshape(lead) for o in (token, stats[0], stats[1], stats[2], sampled)))
    xn = torch.empty(N, H, dtype=W.dtype, device=dev)
    _rmsnorm_kernel[(N,)](x, norm_weight, xn, x.stride(0), xn.stride(0), float(eps), H=H, BLOCK_H=next_pow2(H))
    if sample:
        inv_t = _inv_temperature(temperature, N, dev)
        seeds32 = row_seeds(seed, N, dev).to(torch.int32)  # wraps: the same 32 bits
    else:
        inv_t = seeds32 = xn  # never read

    fp32 = W.dtype == torch.float32
    small = N <= SMALL_ROWS
    kern = _partial_small if small else _partial_large
    meta = None
    if fp32:  # fp32 tiles: a small fixed config (fits shared memory; IEEE dot for exact tests)
        meta = dict(BLOCK_V=64, BLOCK_K=64, num_warps=4, num_stages=2, **({} if small else dict(BLOCK_M=64)))
    if small:
        block_m, gran = max(16, next_pow2(N)), _SMALL_GRAN
    else:  # every large config has BLOCK_M = 128
        block_m, gran = (128 if kern.will_autotune(meta) else kern.meta(meta)["BLOCK_M"]), _LARGE_GRAN
    if not kern.will_autotune(meta):
        gran = max(64, kern.meta(meta)["BLOCK_V"])
    size, P = _splits(N, V, block_m, gran, dev)

    part = torch.empty(4 + 2 * sample, N, P, device=dev)  # m, s, t, best (, gumbel best)
    parg = torch.empty(1 + sample, N, P, dtype=torch.int32, device=dev)  # argmax (, gumbel argmax)
    pg, pga = (part[4], parg[1]) if sample else (part[0], parg[0])
    extra = dict(BLOCK_M=block_m) if small else {}

    def grid(META):
        return (-(-N // META["BLOCK_M"]) * P,)

    kern[grid](
        xn, W, seeds32, inv_t, part[0], part[1], part[2], part[3], parg[0], pg, pga,
        N, V, xn.stride(0), W.stride(0), size, P, min(next_pow2(N), 4096),
        H=H, SAMPLE=sample, PRECISION="ieee" if fp32 else "tf32", GROUP_M=8,
        meta=meta, **extra,
    )
    _combine_kernel[(N,)](
        part[0], part[1], part[2], part[3], parg[0], pg, pga, inv_t,
        token, stats[0], stats[1], stats[2], sampled,
        P, SAMPLE=sample, SPLITS_P2=next_pow2(P),
    )
    return ExitHeadOut(*(o.reshape(lead) for o in (token, stats[0], stats[1], stats[2], sampled)))


# ---- reference -------------------------------------------------------------------------------------

def rmsnorm_reference(h, norm_weight, eps, out_dtype):
    x32 = h.float()
    n = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (n.float() * norm_weight.float()).to(out_dtype)


def exit_head_reference(h, norm_weight, W, *, eps, temperature=0.0, seed=None):
    """PyTorch reference: materialises fp32 logits (N x V); for tests and CPU serving."""
    x, lead = _as_rows(h)
    N = x.shape[0]
    xn = rmsnorm_reference(x, norm_weight, eps, W.dtype)
    z = xn.float() @ W.float().T  # (N, V)
    lse = torch.logsumexp(z, dim=-1)
    zmax, token = z.max(dim=-1)
    p = torch.exp(z - lse[:, None])
    entropy = lse - (p * z).sum(-1)
    if isinstance(temperature, torch.Tensor) or float(temperature) > 0:
        inv_t = _inv_temperature(temperature, N, x.device)
        g = gumbel_noise(row_seeds(seed, N, x.device), z.shape[1])
        sampled = torch.where(inv_t == 0, token, (z * inv_t[:, None] + g).argmax(-1))
    else:
        sampled = token.clone()
    out = ExitHeadOut(token, torch.exp(zmax - lse), entropy, lse, sampled)
    return ExitHeadOut(*(o.reshape(lead) for o in out))
