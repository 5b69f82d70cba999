"""Prefill attention: many query positions per sequence, causal or not, GQA, ragged batches, KV cache.

Math (per sequence, per query head h with kv head h // (Hq/Hkv), scale c = sm_scale):
    s_ij = c * q_i . k_j                       (j visible to i)
    o_i  = sum_j softmax_j(s_i) v_j
Visibility: with T queries over S keys, query i sits at key position i + (S - T) (bottom-right
alignment, so a cached prefix of S - T positions is seen by every query); causal keeps j <= i + S - T.
A query that sees no key (only possible when S < T) gets a zero output, not NaN.

Online softmax (FlashAttention-2), in fp32 and base 2 so the exponentials are single ex2 ops:
    u_ij = s_ij * log2(e)
    m_i' = max(m_i, max_j u_ij);  p_ij = 2^(u_ij - m_i');  alpha = 2^(m_i - m_i')
    l_i' = alpha l_i + sum_j p_ij;  acc_i' = alpha acc_i + sum_j p_ij v_j;   o_i = acc_i / l_i
Key blocks split in two loops: blocks every row of the query block may see in full (no masks, no
bounds checks: the hot loop), then the diagonal/tail blocks with masks.

Layouts (the strides are taken from the tensors, so views work):
  padded  q (B, Hq, T, D), k/v (B, Hkv, S, D)              (SDPA's layout; o like q)
  ragged  q (N, Hq, D), k/v (N, Hkv, D) and cu_seqlens (B+1,) int  (flash-attn varlen; self-attention)
  cache   k_cache/v_cache (B_cache, Hkv, S_max, D); sequence b owns row cache_slots[b] (default b)
          and already holds cache_offsets[b] positions. The new k/v (either layout above) are written
          at [off_b, off_b + len_b) first, then the queries attend to all off_b + len_b positions.
          Positions past S_max are dropped by the Triton write (bounds are the caller's job); the
          reference raises.

Forward only: training goes through SDPA (flash/cuDNN backward); `kernels.prefill_attention`
falls back to the reference whenever autograd needs a graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.backend import HAS_TRITON, config, jit, tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no triton, or one without host tensor descriptors: pointer kernel only
    TensorDescriptor = None

LOG2E = 1.4426950408889634
# Dense batches (no ragged lengths, no cache) load tiles through TMA tensor descriptors; the
# pointer-arithmetic kernel serves ragged batches and caches (and is the fallback).
USE_TMA = HAS_TRITON

# 16-bit configs tried on a GPU (H100: wgmma tiles of 64 rows per warpgroup). fp32 inputs use a
# small fixed config instead (see _meta_fp32): these would not fit in shared memory.
_CONFIGS = [
    config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    config(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    config(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
]


@jit(configs=_CONFIGS, key=["HEAD_DIM", "CAUSAL", "GROUP", "LEN_BUCKET"],
     default=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
     interpret_default=dict(BLOCK_M=32, BLOCK_N=32))
def _prefill_fwd_kernel(
    Q, K, V, O,
    CU, OFFS, SLOTS,  # int32: (B+1,) cumulative lengths [VARLEN]; (B,) cached positions, cache rows [CACHE]
    T, S,             # padded: queries per sequence; keys per sequence (cache: S_max)
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
    qk_scale,  # sm_scale * log2(e)
    H_Q, LEN_BUCKET,  # LEN_BUCKET only keys the autotuner
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, CACHE: tl.constexpr, HAS_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Query blocks in reverse so the longest causal rows start first (better tail balance).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    if VARLEN:
        q_start = tl.load(CU + b)
        q_len = tl.load(CU + b + 1) - q_start
    else:
        q_start = 0
        q_len = T
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        # where this sequence's keys are: (row of K's batch dim, first row, count)
        k_row = b.to(tl.int64)
        if CACHE:
            k_start = 0
            k_len = tl.minimum(tl.load(OFFS + b) + q_len, S)
            if HAS_SLOTS:
                k_row = tl.load(SLOTS + b).to(tl.int64)
        elif VARLEN:
            k_start = q_start
            k_len = q_len
        else:
            k_start = 0
            k_len = S
        shift = k_len - q_len  # query i sits at key position i + shift
        hk = h // GROUP

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_rows = (q_start + offs_m).to(tl.int64)
        q_ptrs = Q + b.to(tl.int64) * sqb + h * sqh + q_rows[:, None] * sqt + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
        k_ptrs = K + k_row * skb + hk * skh + (k_start + offs_n).to(tl.int64)[:, None] * skt + offs_d[None, :]
        v_ptrs = V + k_row * svb + hk * svh + (k_start + offs_n).to(tl.int64)[:, None] * svt + offs_d[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

        if CAUSAL:
            hi = tl.minimum(k_len, m0 + BLOCK_M + shift)  # no row of the block sees keys >= hi
            full = tl.minimum(k_len, m0 + shift + 1)      # every row sees keys < full
        else:
            hi = k_len
            full = k_len
        hi = tl.maximum(hi, 0)
        full = (tl.maximum(full, 0) // BLOCK_N) * BLOCK_N

        # Loop 1: whole blocks visible to every row: no masks.
        for start_n in range(0, full, BLOCK_N):
            k = tl.load(k_ptrs + start_n * skt)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptrs + start_n * svt)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new

        # Loop 2: diagonal and tail blocks: causal and length masks; rows may still be empty.
        for start_n in range(full, hi, BLOCK_N):
            n = start_n + offs_n
            k = tl.load(k_ptrs + start_n * skt, mask=n[:, None] < k_len, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            visible = n[None, :] < k_len
            if CAUSAL:
                visible = visible & (n[None, :] <= offs_m[:, None] + shift)
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row so far
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptrs + start_n * svt, mask=n[:, None] < k_len, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptrs = O + b.to(tl.int64) * sob + h * soh + q_rows[:, None] * sot + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)


def _tma_block_shapes(nargs):
    """Autotune pre-hook: descriptor block shapes follow the config's BLOCK_M / BLOCK_N."""
    d = nargs["HEAD_DIM"]
    nargs["DQ"].block_shape = [1, 1, nargs["BLOCK_M"], d]
    nargs["DO"].block_shape = [1, 1, nargs["BLOCK_M"], d]
    nargs["DK"].block_shape = [1, 1, nargs["BLOCK_N"], d]
    nargs["DV"].block_shape = [1, 1, nargs["BLOCK_N"], d]


_TMA_CONFIGS = [
    config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, pre_hook=_tma_block_shapes),
    config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, pre_hook=_tma_block_shapes),
    config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, pre_hook=_tma_block_shapes),
    config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, pre_hook=_tma_block_shapes),
    config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, pre_hook=_tma_block_shapes),
    config(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, pre_hook=_tma_block_shapes),
]


@jit(configs=_TMA_CONFIGS, key=["HEAD_DIM", "CAUSAL", "GROUP", "LEN_BUCKET"],
     default=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
     interpret_default=dict(BLOCK_M=32, BLOCK_N=32))
def _prefill_fwd_tma_kernel(
    DQ, DK, DV, DO,  # tensor descriptors over q/o (B, Hq, T, D) and k/v (B, Hkv, S, D)
    T, S, qk_scale, H_Q, LEN_BUCKET,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Dense batches only (every sequence has T queries over S keys). Same math as
    # _prefill_fwd_kernel; tiles come through the TMA copy engine, which zero-fills rows past T / S,
    # so tails need no load masks, and clips the output store at T.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    shift = S - T
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = DQ.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        hi = tl.minimum(S, m0 + BLOCK_M + shift)
        full = tl.minimum(S, m0 + shift + 1)
    else:
        hi = S
        full = S
    hi = tl.maximum(hi, 0)
    full = (tl.maximum(full, 0) // BLOCK_N) * BLOCK_N

    for start_n in range(0, full, BLOCK_N):
        k = DK.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = DV.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    for start_n in range(full, hi, BLOCK_N):
        n = start_n + offs_n
        k = DK.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = n[None, :] < S
        if CAUSAL:
            visible = visible & (n[None, :] <= offs_m[:, None] + shift)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = DV.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    DO.store([b, h, m0, 0], out.to(q.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))


@jit(default=dict(BLOCK_T=64, num_warps=4), interpret_default=dict(BLOCK_T=64))
def _kv_write_kernel(
    K, V, KC, VC, CU, OFFS, SLOTS, T,
    skb, skt, skh, svb, svt, svh, sckb, sckt, sckh, scvb, scvt, scvh,
    S_MAX, H_KV,
    VARLEN: tl.constexpr, HAS_SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # cache[slot_b, h, off_b + t] = new[b, h, t] for t < len_b (and off_b + t < S_MAX)
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    if VARLEN:
        src = tl.load(CU + b)
        n = tl.load(CU + b + 1) - src
    else:
        src = 0
        n = T
    if pid_t * BLOCK_T < n:
        off = tl.load(OFFS + b)
        slot = b.to(tl.int64)
        if HAS_SLOTS:
            slot = tl.load(SLOTS + b).to(tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, HEAD_DIM)
        mask = ((t < n) & (off + t < S_MAX))[:, None]
        src_rows = (src + t).to(tl.int64)[:, None]
        dst_rows = (off + t).to(tl.int64)[:, None]
        kt = tl.load(K + b.to(tl.int64) * skb + h * skh + src_rows * skt + d[None, :], mask=mask)
        vt = tl.load(V + b.to(tl.int64) * svb + h * svh + src_rows * svt + d[None, :], mask=mask)
        tl.store(KC + slot * sckb + h * sckh + dst_rows * sckt + d[None, :], kt.to(KC.dtype.element_ty), mask=mask)
        tl.store(VC + slot * scvb + h * scvh + dst_rows * scvt + d[None, :], vt.to(VC.dtype.element_ty), mask=mask)


# ---- sequence bookkeeping shared by the launcher and the reference ---------------------------------

def _seq_layout(q, k, cu_seqlens, max_seqlen):
    """Per-sequence (start, len) of the new rows, the row strides (batch, token, head), B, max len."""
    if cu_seqlens is not None:
        if q.dim() != 3 or k.dim() != 3:
            raise ValueError("with cu_seqlens, q and k/v are packed (N, H, D)")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        start, length = cu[:-1].contiguous(), (cu[1:] - cu[:-1]).contiguous()
        max_len = int(max_seqlen) if max_seqlen is not None else int(length.max().item()) if len(length) else 0
        return start, length, cu.numel() - 1, max_len, True
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("without cu_seqlens, q is (B, Hq, T, D) and k/v are (B, Hkv, S, D)")
    B, T = q.shape[0], q.shape[2]
    start = torch.zeros(B, dtype=torch.int32, device=q.device)
    length = torch.full((B,), T, dtype=torch.int32, device=q.device)
    return start, length, B, T, False


def _strides(x, varlen):
    """(batch, token, head) strides: varlen rows are (N, H, D), padded are (B, H, T, D)."""
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(2), x.stride(1)


KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)  # the Triton kernels' tiles; the references take any


def _check_heads(q, k, varlen, kernel=False):
    hq, hkv = (q.shape[1], k.shape[1])
    d = q.shape[-1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if k.shape[-1] != d:
        raise ValueError(f"q and k/v head dims differ: {d} vs {k.shape[-1]}")
    if kernel and d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the Triton kernel takes head dims {KERNEL_HEAD_DIMS}, got {d}")
    if kernel and (q.stride(-1) != 1 or k.stride(-1) != 1):
        raise ValueError("the head dim must be contiguous (stride 1)")
    return hq, hkv, d


def _int32(x, device):
    """x as int32 on device, converting only when needed (each conversion is a launch)."""
    if x is None:
        return None
    x = torch.as_tensor(x, device=device)
    return x if x.dtype == torch.int32 else x.to(torch.int32)


def _max_len(cu, max_seqlen):
    if max_seqlen is not None:
        return int(max_seqlen)
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0  # one host sync


def write_kv_cache_triton(k_cache, v_cache, k, v, cache_offsets, *, cu_seqlens=None, cache_slots=None,
                          max_seqlen=None):
    """Write new keys/values into the cache (layout in the module docstring). Returns nothing."""
    dev = k.device
    varlen = cu_seqlens is not None
    cu = _int32(cu_seqlens, dev)
    offs = _int32(cache_offsets, dev)
    slots = _int32(cache_slots, dev)
    if varlen:
        B, T, max_len = cu.numel() - 1, 0, _max_len(cu, max_seqlen)
    else:
        B, T = k.shape[0], k.shape[2]
        max_len = T
    hkv, d = k.shape[1], k.shape[-1]
    if max_len == 0 or B == 0:
        return
    skb, skt, skh = _strides(k, varlen)
    svb, svt, svh = _strides(v, varlen)
    meta = _kv_write_kernel.meta()
    grid = (triton_cdiv(max_len, meta["BLOCK_T"]), B * hkv)
    _kv_write_kernel[grid](
        k, v, k_cache, v_cache, cu if varlen else offs, offs, slots if slots is not None else offs, T,
        skb, skt, skh, svb, svt, svh,
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(2), v_cache.stride(1),
        k_cache.shape[2], hkv, VARLEN=varlen, HAS_SLOTS=slots is not None, HEAD_DIM=d,
    )


def write_kv_cache_reference(k_cache, v_cache, k, v, cache_offsets, *, cu_seqlens=None, cache_slots=None,
                             max_seqlen=None):
    if cu_seqlens is not None and max_seqlen == 1 and k.dim() == 3 and k.shape[0] == 1 == cu_seqlens.numel() - 1:
        # a batch-1 decode step (the CPU's common step): one row at one offset, by plain indexing
        s = 0 if cache_slots is None else int(cache_slots.reshape(-1)[0])
        o = int(cache_offsets.reshape(-1)[0])
        if o + 1 > k_cache.shape[2]:
            raise ValueError(f"sequence 0: positions up to {o + 1} exceed the cache's {k_cache.shape[2]}")
        k_cache[s, :, o] = k[0].to(k_cache.dtype)
        v_cache[s, :, o] = v[0].to(v_cache.dtype)
        return
    start, length, B, max_len, varlen = _seq_layout(k, k, cu_seqlens, max_seqlen)
    if B == 0:
        return
    dev = k_cache.device
    length, offs = length.to(dev).long(), cache_offsets.to(dev).long()
    slots = torch.arange(B, device=dev) if cache_slots is None else cache_slots.to(dev).long()
    over = (offs + length) > k_cache.shape[2]
    if bool(over.any()):
        b = int(over.nonzero()[0])
        raise ValueError(f"sequence {b}: positions up to {int(offs[b] + length[b])} exceed the cache's {k_cache.shape[2]}")
    if varlen and max_len == 1 and k.shape[0] == B:  # a decode step: one row per sequence, at its offset
        k_cache[slots, :, offs] = k.to(k_cache.dtype)  # (the general path's index arithmetic is 9x this)
        v_cache[slots, :, offs] = v.to(v_cache.dtype)
        return
    # one row per new token: its sequence, its index within the sequence's new rows, its cache position
    seq = torch.repeat_interleave(torch.arange(B, device=dev), length)
    within = torch.arange(seq.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
    pos = offs[seq] + within
    if varlen:
        kk, vv = k[start.to(dev).long()[seq] + within], v[start.to(dev).long()[seq] + within]   # (N, Hkv, D)
    else:
        kk, vv = k.transpose(1, 2)[seq, within], v.transpose(1, 2)[seq, within]               # from (B, Hkv, T, D)
    k_cache[slots[seq], :, pos] = kk.to(k_cache.dtype)
    v_cache[slots[seq], :, pos] = vv.to(v_cache.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _meta_fp32(d):
    # fp32 tiles are twice the bytes: keep q (64 x D) + two stages of k/v within shared memory.
    return dict(BLOCK_M=64, BLOCK_N=32 if d >= 128 else 64, num_warps=4, num_stages=2)


# ---- launcher --------------------------------------------------------------------------------------

def prefill_attention_triton(q, k, v, *, causal=True, cu_seqlens=None, k_cache=None, v_cache=None,
                             cache_offsets=None, sm_scale=None, max_seqlen=None, cache_slots=None, kv_written=False):
    """Triton prefill attention; same signature and result as `prefill_attention_reference`.

    Host work is allocations and launches only (plus one sync for a ragged batch without
    max_seqlen): the per-sequence bookkeeping is read by the kernels from cu_seqlens/cache_offsets.
    """
    hq, hkv, d = _check_heads(q, k, cu_seqlens is not None, kernel=True)
    dev = q.device
    varlen = cu_seqlens is not None
    cache = k_cache is not None
    cu = _int32(cu_seqlens, dev)
    if varlen:
        B, T, max_len = cu.numel() - 1, 0, _max_len(cu, max_seqlen)
    else:
        B, T = q.shape[0], q.shape[2]
        max_len = T
    o = torch.empty_like(q)
    if B == 0 or max_len == 0:
        return o
    offs = slots = None
    if cache:
        if cache_offsets is None:
            raise ValueError("k_cache needs cache_offsets (positions already cached per sequence)")
        offs, slots = _int32(cache_offsets, dev), _int32(cache_slots, dev)
        if not kv_written:  # kv_written: the new rows' K/V are in the cache already (e.g. by rope_qkv)
            write_kv_cache_triton(k_cache, v_cache, k, v, offs, cu_seqlens=cu, cache_slots=slots, max_seqlen=max_len)
        K, V, S = k_cache, v_cache, k_cache.shape[2]
        skb, skt, skh = k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)
        svb, svt, svh = v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)
    else:
        if USE_TMA and not varlen and _tma_ok(q, k, v, o):
            return _prefill_dense_tma(q, k, v, o, causal, sm_scale)
        K, V, S = k, v, (0 if varlen else k.shape[2])
        skb, skt, skh = _strides(k, varlen)
        svb, svt, svh = _strides(v, varlen)
    sqb, sqt, sqh = _strides(q, varlen)
    sob, sot, soh = _strides(o, varlen)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    fp32 = q.dtype == torch.float32
    meta = _meta_fp32(d) if fp32 else None
    dummy = cu if cu is not None else (offs if offs is not None else o)  # never-read pointer arguments

    def grid(META):
        return (triton_cdiv(max_len, META["BLOCK_M"]), B * hq)

    _prefill_fwd_kernel[grid](
        q, K, V, o, dummy if cu is None else cu, dummy if offs is None else offs,
        dummy if slots is None else slots, T, S,
        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
        scale * LOG2E, hq, _len_bucket(max_len),
        GROUP=hq // hkv, HEAD_DIM=d, CAUSAL=bool(causal), PRECISION="ieee" if fp32 else "tf32",
        VARLEN=varlen, CACHE=cache, HAS_SLOTS=slots is not None, meta=meta,
    )
    return o


def _tma_ok(*ts) -> bool:
    """TMA needs 16-byte aligned base addresses and non-innermost strides."""
    if TensorDescriptor is None:
        return False
    for t in ts:
        e = t.element_size()
        if t.data_ptr() % 16 or any((st * e) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _prefill_dense_tma(q, k, v, o, causal, sm_scale):
    B, hq, T, d = q.shape
    hkv, S = k.shape[1], k.shape[2]
    fp32 = q.dtype == torch.float32
    meta = _meta_fp32(d) if fp32 else None
    kern = _prefill_fwd_tma_kernel
    bm, bn = (128, 64) if kern.will_autotune(meta) else (kern.meta(meta)["BLOCK_M"], kern.meta(meta)["BLOCK_N"])
    descs = [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, blk, d])
             for x, blk in ((q, bm), (k, bn), (v, bn), (o, bm))]

    def grid(META):
        return (triton_cdiv(T, META["BLOCK_M"]), B * hq)

    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    kern[grid](*descs, T, S, scale * LOG2E, hq, _len_bucket(T),
               GROUP=hq // hkv, HEAD_DIM=d, CAUSAL=bool(causal), PRECISION="ieee" if fp32 else "tf32", meta=meta)
    return o


def _len_bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---- reference -------------------------------------------------------------------------------------

def _attend_one(q_HTD, k_HSD, v_HSD, causal, scale):
    """Reference attention for one sequence, bottom-right causal, zero rows where nothing is visible."""
    T, S = q_HTD.shape[1], k_HSD.shape[1]
    g = q_HTD.shape[0] // k_HSD.shape[0]
    k_HSD = k_HSD.repeat_interleave(g, dim=0)
    v_HSD = v_HSD.repeat_interleave(g, dim=0)
    if not causal:
        return F.scaled_dot_product_attention(q_HTD[None], k_HSD[None], v_HSD[None], scale=scale)[0]
    i = torch.arange(T, device=q_HTD.device)[:, None]
    j = torch.arange(S, device=q_HTD.device)[None, :]
    mask_TS = j <= i + (S - T)
    o = F.scaled_dot_product_attention(q_HTD[None], k_HSD[None], v_HSD[None], attn_mask=mask_TS, scale=scale)[0]
    return torch.where(mask_TS.any(1)[None, :, None], o, torch.zeros_like(o))


def prefill_attention_reference(q, k, v, *, causal=True, cu_seqlens=None, k_cache=None, v_cache=None,
                                cache_offsets=None, sm_scale=None, max_seqlen=None, cache_slots=None,
                                kv_written=False):
    """PyTorch reference (SDPA). The dense case (padded, no cache, T == S or not causal) is one SDPA
    call on its fastest backend; that is the path the dispatcher picks when SDPA measured faster."""
    hq, hkv, d = _check_heads(q, k, cu_seqlens is not None)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    varlen = cu_seqlens is not None
    if k_cache is None and not varlen and (not causal or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale, enable_gqa=hq != hkv)
    q_start, q_len, B, _, _ = _seq_layout(q, k, cu_seqlens, max_seqlen)
    if k_cache is not None and not kv_written:
        write_kv_cache_reference(k_cache, v_cache, k, v, cache_offsets, cu_seqlens=cu_seqlens,
                                 cache_slots=cache_slots)
    slots = list(range(B)) if cache_slots is None else cache_slots.tolist()
    o = torch.empty_like(q)
    for b in range(B):
        s, n = int(q_start[b]), int(q_len[b])
        qb = q[s:s + n].transpose(0, 1) if varlen else q[b]  # (Hq, n, D)
        if k_cache is not None:
            total = int(cache_offsets[b]) + n
            kb, vb = k_cache[slots[b], :, :total], v_cache[slots[b], :, :total]
        elif varlen:
            kb, vb = k[s:s + n].transpose(0, 1), v[s:s + n].transpose(0, 1)
        else:
            kb, vb = k[b], v[b]
        ob = _attend_one(qb, kb.to(q.dtype), vb.to(q.dtype), causal, scale)
        if varlen:
            o[s:s + n] = ob.transpose(0, 1)
        else:
            o[b] = ob
    return o
