"""Decode attention over a KV cache: 1..8 new queries per sequence, ragged cache lengths, split-KV.

Shapes: q (B, n_q, Hq, D) with n_q <= 8 (one decode step, or n_q drafted tokens to verify);
k_cache/v_cache (B_cache, Hkv, S_max, D); cache_lens (B,) int = valid positions of sequence b,
*including* its n_q new tokens (write those first, e.g. with `write_kv_cache`); sequence b reads
cache row cache_slots[b] (default b). Query t of sequence b sits at position L_b - n_q + t and sees
keys j <= L_b - n_q + t (so the drafted tokens attend causally to each other). Output like q.

Flash-decoding: split the L keys of each (sequence, kv head) into P chunks; program (b, kv head, p)
computes, for all G = Hq/Hkv query heads of that kv head and all n_q tokens (GQA packing: M = G*n_q
rows share every K/V tile, so each cache byte is read once):
    m_p = max_j s_j,  l_p = sum_j 2^(s_j - m_p),  o_p = sum_j 2^(s_j - m_p) v_j / l_p,
    lse_p = m_p + log2 l_p            (scores s in base 2: s = c * log2(e) * q.k)
and a combine kernel merges the chunks (with P = 1 the split kernel writes the output itself):
    o = sum_p 2^(lse_p - M) o_p / sum_p 2^(lse_p - M),   M = max_p lse_p   (empty chunks: lse = -inf).
P is fixed at launch from shapes only (never from cache_lens), so a captured CUDA graph stays valid
when lengths change: chunk size = ceil(L_b / P) rounded up to the key block, computed on the device.

Not here: writing the new tokens' K/V (see `kernels.attention_prefill.write_kv_cache`) and paging.
"""
from __future__ import annotations

import math

import torch

from kernels.attention_prefill import KERNEL_HEAD_DIMS, _int32
from kernels.backend import config, env_on, jit, next_pow2, num_sms, pdl, tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 64

_SPLIT_CONFIGS = [
    config(BLOCK_N=64, num_warps=4, num_stages=3),
    config(BLOCK_N=64, num_warps=4, num_stages=4),
    config(BLOCK_N=128, num_warps=4, num_stages=3),
    config(BLOCK_N=32, num_warps=4, num_stages=5),
]


@jit(configs=_SPLIT_CONFIGS, key=["HEAD_DIM", "GROUP", "N_Q", "SPLITS", "LEN_BUCKET"],
     default=dict(BLOCK_N=64, num_warps=4, num_stages=3), interpret_default=dict(BLOCK_N=32))
def _decode_split_kernel(
    Q, K, V, LENS, SLOTS, O_PART, LSE_PART, O, LOCKS,
    sqb, sqt, sqh, skb, skh, skt, svb, svh, svt, sob, sot, soh,
    qk_scale, H_KV, LEN_BUCKET,
    SPLITS, N_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False, FUSE_COMBINE: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    p = tl.program_id(1)
    if PDL:  # kernels.backend.pdl: the new K/V rows and q are the previous kernel's output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    L = tl.load(LENS + b)
    slot = b.to(tl.int64)
    if HAS_SLOTS:
        slot = tl.load(SLOTS + b).to(tl.int64)
    # rows r = t * GROUP + g: query token t, query head hk * GROUP + g
    r = tl.arange(0, BLOCK_M)
    t = r // GROUP
    g = r % GROUP
    row_ok = r < N_Q * GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * sqb + t[:, None] * sqt + (hk * GROUP + g)[:, None] * sqh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    q_pos = L - N_Q + t  # last key each row may see

    chunk = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
    lo = p * chunk
    hi = tl.minimum(lo + chunk, L)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = K + slot * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :]
    v_ptrs = V + slot * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        k = tl.load(k_ptrs + start_n * skt, mask=n[:, None] < hi, other=0.0)
        v = tl.load(v_ptrs + start_n * svt, mask=n[:, None] < hi, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((n[None, :] < hi) & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        pr = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = tl.dot(pr.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    hq = hk * GROUP + g
    if SPLITS == 1:  # the whole cache in one chunk: this is the answer
        o_ptrs = O + b.to(tl.int64) * sob + t[:, None] * sot + hq[:, None] * soh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        # partials: (B, Hq, N_Q, SPLITS, D) and (B, Hq, N_Q, SPLITS), fp32
        base = ((b * (H_KV * GROUP) + hq) * N_Q + t).to(tl.int64) * SPLITS + p
        tl.store(LSE_PART + base, lse, mask=row_ok)
        tl.store(O_PART + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        if FUSE_COMBINE:  # the last program of (b, kv head) to finish merges the chunks: no combine launch
            tl.debug_barrier()  # every thread's partials stored before the release below
            done = tl.atomic_add(LOCKS + pid_bh, 1, sem="acq_rel")
            if done == SPLITS - 1:
                tl.store(LOCKS + pid_bh, 0)  # ready for the next launch (stream order; PDL waits first)
                first = base - p
                m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                den = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
                for sp in range(0, SPLITS):  # .cg: other SMs wrote these; never a stale L1 line
                    lse_s = tl.load(LSE_PART + first + sp, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                    o_s = tl.load(O_PART + (first + sp)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None],
                                  other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m, lse_s)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    a = tl.math.exp2(m - m_safe)
                    w = tl.math.exp2(lse_s - m_safe)  # 0 for empty chunks
                    den = den * a + w
                    acc = acc * a[:, None] + o_s * w[:, None]
                    m = m_new
                res = acc / tl.where(den > 0.0, den, 1.0)[:, None]
                o_ptrs = O + b.to(tl.int64) * sob + t[:, None] * sot + hq[:, None] * soh + offs_d[None, :]
                tl.store(o_ptrs, res.to(O.dtype.element_ty), mask=row_ok[:, None])


@jit(default=dict(num_warps=4), interpret_default=dict())
def _decode_combine_kernel(
    O_PART, LSE_PART, O, sob, sot, soh, H_Q, SPLITS,
    N_Q: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr = False,
):
    row = tl.program_id(0)  # over (b, hq, t)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = row % N_Q
    hq = (row // N_Q) % H_Q
    b = row // (N_Q * H_Q)
    sp = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(LSE_PART + row.to(tl.int64) * SPLITS + sp, mask=sp < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # 0 for empty chunks
    o = tl.load(O_PART + (row.to(tl.int64) * SPLITS + sp)[:, None] * HEAD_DIM + d[None, :],
                mask=(sp < SPLITS)[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(O + b.to(tl.int64) * sob + t * sot + hq * soh + d, out.to(O.dtype.element_ty))


def choose_splits(batch: int, n_kv_heads: int, s_max: int, device=None, max_splits: int = MAX_SPLITS) -> int:
    """Number of KV chunks: about one wave of (sequence x kv head x chunk) programs on the GPU, no
    chunk under 128 keys at full capacity. Measured on the H100 at batch 1 (kernels_decode.json,
    triton_splits*): one wave beat two and four at caches >= 4k; short caches want the 128-key
    floor. Depends on shapes only, never on cache_lens, so a captured CUDA graph stays valid."""
    want = math.ceil(num_sms(device) / max(1, batch * n_kv_heads))
    return int(max(1, min(max_splits, want, math.ceil(s_max / 128))))


_LOCKS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # smaller counters that captured CUDA graphs may still point at


def _locks(dev: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 arrival counters, one per (sequence, kv head), for the fused combine; each launch
    leaves them zero again. Kept per device for the life of the process (a grown buffer keeps the old
    one alive too: graphs captured with it read it on every replay). Launches sharing counters must not
    overlap, so they go on one stream (the engine's). None while a CUDA graph is being captured and no
    buffer is big enough yet (one made in capture would be zeroed only on replay): the caller then
    launches the combine kernel instead."""
    buf = _LOCKS.get(dev)
    if buf is None or buf.numel() < n:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _LOCKS[dev] = torch.zeros(max(n, 4096, 2 * (buf.numel() if buf is not None else 0)),
                                        dtype=torch.int32, device=dev)
    return buf


def decode_attention_triton(q, k_cache, v_cache, cache_lens, *, sm_scale=None, max_splits=MAX_SPLITS,
                            cache_slots=None, num_splits=None):
    """Triton split-KV decode attention; same signature and result as `decode_attention_reference`.
    With P > 1 chunks the last program of each (sequence, kv head) to finish merges them, unless
    FAMILIAL_FUSED_COMBINE=0: then a second kernel does."""
    B, n_q, hq, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    _check(q, k_cache, n_q, hq, hkv, d, kernel=True)
    dev = q.device
    lens = _int32(cache_lens, dev)
    slots = _int32(cache_slots, dev)
    P = int(num_splits) if num_splits is not None else choose_splits(B, hkv, s_max, dev, max_splits)
    G = hq // hkv
    o = torch.empty_like(q)
    if B == 0:
        return o
    # partials only exist with P > 1 (a 1-element fp32 stand-in keeps one kernel specialisation)
    o_part = torch.empty((B, hq, n_q, P, d) if P > 1 else (1,), device=dev, dtype=torch.float32)
    lse_part = torch.empty((B, hq, n_q, P) if P > 1 else (1,), device=dev, dtype=torch.float32)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    fp32 = q.dtype == torch.float32
    locks = _locks(dev, B * hkv) if P > 1 and env_on("FAMILIAL_FUSED_COMBINE", True) else None
    _decode_split_kernel[(B * hkv, P)](
        q, k_cache, v_cache, lens, lens if slots is None else slots, o_part, lse_part, o,
        locks if locks is not None else lens,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        scale * LOG2E, hkv, next_pow2(s_max), P,
        N_Q=n_q, GROUP=G, HEAD_DIM=d, BLOCK_M=max(16, next_pow2(n_q * G)),
        PRECISION="ieee" if fp32 else "tf32", HAS_SLOTS=slots is not None,
        meta=dict(BLOCK_N=32, num_warps=4, num_stages=2) if fp32 else None, **pdl(q, "attention"),
        FUSE_COMBINE=locks is not None,
    )
    if P > 1 and locks is None:
        _decode_combine_kernel[(B * hq * n_q,)](
            o_part, lse_part, o, o.stride(0), o.stride(1), o.stride(2), hq, P,
            N_Q=n_q, SPLITS_P2=next_pow2(P), HEAD_DIM=d, **pdl(o, "attention"),
        )
    return o


def _check(q, k_cache, n_q, hq, hkv, d, kernel=False):
    if not 1 <= n_q <= 8:
        raise ValueError(f"decode takes 1..8 query tokens per sequence, got {n_q}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if k_cache.shape[-1] != d:
        raise ValueError(f"q and cache head dims differ: {d} vs {k_cache.shape[-1]}")
    if kernel and d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the Triton kernel takes head dims {KERNEL_HEAD_DIMS}, got {d}")
    if kernel and (q.stride(-1) != 1 or k_cache.stride(-1) != 1):
        raise ValueError("the head dim must be contiguous (stride 1)")


def decode_attention_reference(q, k_cache, v_cache, cache_lens, *, sm_scale=None, max_splits=MAX_SPLITS,
                               cache_slots=None, num_splits=None):
    """PyTorch reference, batched: gather every sequence's cache rows up to the longest length, mask
    each row to its own causal window, one SDPA call (GQA by SDPA's own grouping)."""
    B, n_q, hq, d = q.shape
    hkv = k_cache.shape[1]
    _check(q, k_cache, n_q, hq, hkv, d)
    if B == 0:
        return torch.zeros_like(q)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    lens = cache_lens.to(device=q.device, dtype=torch.long)
    L = int(lens.max())
    if L <= 0:
        return torch.zeros_like(q)
    gqa = hq != hkv
    if B == 1:  # one sequence (the CPU's batch-1 step): a view of its slot, no gather
        s = 0 if cache_slots is None else int(cache_slots.reshape(-1)[0])
        k, v = k_cache[s, :, :L][None].to(q.dtype), v_cache[s, :, :L][None].to(q.dtype)  # (1, Hkv, L, D)
    else:
        slots = torch.arange(B, device=q.device) if cache_slots is None else cache_slots.to(q.device).long()
        k = k_cache[slots, :, :L].to(q.dtype)  # (B, Hkv, L, D)
        v = v_cache[slots, :, :L].to(q.dtype)
    if n_q == 1 and (B == 1 or bool((lens == L).all())):  # every query sees its whole cache: no mask
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    i = torch.arange(n_q, device=q.device)
    j = torch.arange(L, device=q.device)
    # query t of sequence b sits at position lens_b - n_q + t and sees keys j <= that position
    mask = j[None, None, :] <= (lens[:, None, None] - n_q + i[None, :, None])   # (B, n_q, L)
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                                         scale=scale, enable_gqa=gqa)  # (B, Hq, n_q, D)
    o = torch.where(mask.any(-1)[:, None, :, None], o, torch.zeros_like(o))
    return o.transpose(1, 2)
