"""kernels: fused Triton kernels for the familial model, each with a PyTorch reference.

Public ops (Triton on CUDA, the reference elsewhere; `FAMILIAL_KERNELS=auto|torch|triton`, see
kernels/backend.py):
  prefill_attention   causal/non-causal GQA attention over ragged batches and a KV cache (forward)
  decode_attention    split-KV decode over a KV cache, 1..8 queries per sequence (forward)
  write_kv_cache      write new keys/values into the cache layout both attention ops read
  exit_head           RMSNorm + unembedding + softmax statistics (+ Gumbel sample), no logits
  add_rmsnorm, rope_qkv, silu_mul   a serving decoder block's elementwise work, one kernel each
  linear_1row         a linear layer on one row (batch-1 decode), optionally after silu(gate) * up
  add_rmsnorm_linear  add_rmsnorm then a linear layer, one kernel on one row
  add_rmsnorm_qkv_rope  add_rmsnorm, the q/k/v projection and rope_qkv, one kernel on one row
  multi_exit_linear_cross_entropy   training loss and gradients of G exits, chunked
Each `<op>_reference` has the same signature. Layouts and numerics: docs/kernels.md.
This package imports only torch (and triton when present); it knows nothing of the model.
"""
from __future__ import annotations

import torch

from kernels import dispatch
from kernels.attention_decode import MAX_SPLITS, decode_attention_reference, decode_attention_triton
from kernels.attention_prefill import (KERNEL_HEAD_DIMS, prefill_attention_reference, prefill_attention_triton,
                                       write_kv_cache_reference, write_kv_cache_triton)
from kernels.backend import env_on, mode, use_triton
from kernels.exit_head import ExitHeadOut, exit_head_reference, exit_head_triton
from kernels.fused_block import (add_rmsnorm_reference, add_rmsnorm_triton, rope_qkv_reference, rope_qkv_triton,
                                 silu_mul_reference, silu_mul_triton)
from kernels.gemv import (norm_linear_reference, norm_linear_rope_reference, norm_linear_rope_triton,
                          norm_linear_triton, rows_config, skinny_linear_reference, skinny_linear_triton)
from kernels.linear_ce import (multi_exit_linear_cross_entropy_reference,
                               multi_exit_linear_cross_entropy_triton)


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_shape(q, k) -> bool:
    """Head dims and layouts the attention kernels tile; anything else runs the reference."""
    return q.shape[-1] in KERNEL_HEAD_DIMS and q.stride(-1) == 1 and k.stride(-1) == 1


def prefill_attention(q, k, v, *, causal=True, cu_seqlens=None, k_cache=None, v_cache=None,
                      cache_offsets=None, sm_scale=None, max_seqlen=None, cache_slots=None, kv_written=False):
    """Attention of new positions over themselves and any cached prefix. Layouts: attention_prefill.py.

    The Triton kernel is forward-only: when autograd needs a graph this is SDPA (flash/cuDNN
    backward). Dense shapes go to whichever of Triton and SDPA measured faster (kernels/dispatch.py).
    """
    kw = dict(causal=causal, cu_seqlens=cu_seqlens, k_cache=k_cache, v_cache=v_cache,
              cache_offsets=cache_offsets, sm_scale=sm_scale, max_seqlen=max_seqlen, cache_slots=cache_slots,
              kv_written=kv_written)
    if _needs_graph(q, k, v) or not _kernel_shape(q, k) or not use_triton(q, k, v, k_cache):
        return prefill_attention_reference(q, k, v, **kw)
    dense = cu_seqlens is None and k_cache is None and q.shape[2] == k.shape[2]
    if dense and mode() == "auto" and dispatch.prefill_choice(q.shape[-1], causal, q.shape[2]) == "sdpa":
        return prefill_attention_reference(q, k, v, **kw)
    return prefill_attention_triton(q, k, v, **kw)


def decode_attention(q, k_cache, v_cache, cache_lens, *, sm_scale=None, max_splits=MAX_SPLITS,
                     cache_slots=None, num_splits=None):
    """Attention of 1..8 new queries per sequence over its cache (new K/V already written)."""
    kw = dict(sm_scale=sm_scale, max_splits=max_splits, cache_slots=cache_slots, num_splits=num_splits)
    if _needs_graph(q, k_cache, v_cache) or not _kernel_shape(q, k_cache) or not use_triton(q, k_cache, v_cache):
        return decode_attention_reference(q, k_cache, v_cache, cache_lens, **kw)
    return decode_attention_triton(q, k_cache, v_cache, cache_lens, **kw)


def write_kv_cache(k_cache, v_cache, k, v, cache_offsets, *, cu_seqlens=None, cache_slots=None, max_seqlen=None):
    """cache[slot_b, :, off_b : off_b + len_b] = new k/v of sequence b (padded or packed layout)."""
    kw = dict(cu_seqlens=cu_seqlens, cache_slots=cache_slots, max_seqlen=max_seqlen)
    if use_triton(k_cache, k):
        return write_kv_cache_triton(k_cache, v_cache, k, v, cache_offsets, **kw)
    return write_kv_cache_reference(k_cache, v_cache, k, v, cache_offsets, **kw)


def exit_head(h, norm_weight, W, *, eps, temperature=0.0, seed=None) -> ExitHeadOut:
    """Per row: argmax token, its probability, entropy, logsumexp and a sampled token (no logits)."""
    kw = dict(eps=eps, temperature=temperature, seed=seed)
    if use_triton(h, norm_weight, W):
        return exit_head_triton(h, norm_weight, W, **kw)
    return exit_head_reference(h, norm_weight, W, **kw)


def add_rmsnorm(h, d, w, *, eps):
    """(h + d, rmsnorm(h + d) * w); d None: (h, rmsnorm(h) * w). Rows (N, D)."""
    if use_triton(h, d, w):
        return add_rmsnorm_triton(h, d, w, eps)
    return add_rmsnorm_reference(h, d, w, eps)


def rope_qkv(qkv, pos, slots, cos, sin, k_cache, v_cache, *, n_heads, n_kv_heads):
    """RoPE on packed q/k/v rows; k and v written into the cache at (slot, pos); returns q (N, H, E)."""
    E = k_cache.shape[-1]
    if use_triton(qkv, k_cache) and E & (E - 1) == 0:  # the kernel tiles a power-of-two head dim
        return rope_qkv_triton(qkv, pos, slots, cos, sin, k_cache, v_cache, n_heads, n_kv_heads)
    return rope_qkv_reference(qkv, pos, slots, cos, sin, k_cache, v_cache, n_heads, n_kv_heads)


def silu_mul(gu):
    """[gate | up] (N, 2F) -> silu(gate) * up (N, F)."""
    if use_triton(gu):
        return silu_mul_triton(gu)
    return silu_mul_reference(gu)


def _one_row(x, w) -> bool:
    return (x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype
            and x.stride(-1) == 1 and w.is_contiguous() and use_triton(x, w) and not _needs_graph(x, w))


def add_rmsnorm_linear(h, d, norm_weight, w, *, eps: float):
    """add_rmsnorm(h, d) followed by a linear layer: (h + d, x @ w^T). One row on CUDA is one kernel
    (kernels/gemv.py's NORM prologue); anything else is add_rmsnorm then linear_1row."""
    if _one_row(h, w) and (d is None or d.stride(-1) == 1):
        return norm_linear_triton(h, d, norm_weight, eps, w, **rows_config(w.shape[0], w.shape[1], False))
    h, x = add_rmsnorm(h, d, norm_weight, eps=eps)
    return h, linear_1row(x, w)


def add_rmsnorm_qkv_rope(h, d, norm_weight, w_qkv, pos, slots, cos, sin, k_cache, v_cache, *, eps: float,
                         n_heads: int, n_kv_heads: int):
    """add_rmsnorm, the fused q/k/v projection and rope_qkv: (h + d, q (N, H, E)), k and v written into
    the cache at (slot, pos). One row on CUDA is one kernel (kernels/gemv.py's NORM prologue and ROPE
    epilogue; FAMILIAL_FUSED_ROPE=0 turns it off); anything else is add_rmsnorm_linear then rope_qkv."""
    E = k_cache.shape[-1]
    if (_one_row(h, w_qkv) and (d is None or d.stride(-1) == 1)
            and env_on("FAMILIAL_FUSED_ROPE", True)):
        cfg = rows_config(w_qkv.shape[0], w_qkv.shape[1], False)
        if E % cfg["block_n"] == 0:
            return norm_linear_rope_triton(h, d, norm_weight, eps, w_qkv, pos, slots, cos, sin, k_cache, v_cache,
                                           n_heads, n_kv_heads, **cfg)
    h, qkv = add_rmsnorm_linear(h, d, norm_weight, w_qkv, eps=eps)
    return h, rope_qkv(qkv, pos, slots, cos, sin, k_cache, v_cache, n_heads=n_heads, n_kv_heads=n_kv_heads)


def linear_1row(x, w, *, silu: bool = False):
    """x (N, K) @ w^T (silu: x is [gate | up] (N, 2K), silu(gate) * up first). One row of 16-bit x on CUDA
    streams w through kernels/gemv.py's rows kernel (batch-1 decode); anything else is F.linear
    (after silu_mul)."""
    if _one_row(x, w):
        return skinny_linear_triton(x, w, silu=silu, **rows_config(w.shape[0], w.shape[1], silu))
    return torch.nn.functional.linear(silu_mul(x) if silu else x, w)


def multi_exit_linear_cross_entropy(hs, W, targets, *, weights=None, ignore_index=-100, chunk_rows=None,
                                    return_per_exit=False):
    """sum_g w_g CE(h_g W_g^T, targets), gradients for every h_g and W; (loss, per-exit CE) if asked."""
    kw = dict(weights=weights, ignore_index=ignore_index, chunk_rows=chunk_rows, return_per_exit=return_per_exit)
    Ws = list(W) if isinstance(W, (list, tuple)) else [W]
    hs_l = [hs] if isinstance(hs, torch.Tensor) else list(hs)
    if use_triton(*hs_l, *Ws, targets):
        return multi_exit_linear_cross_entropy_triton(hs, W, targets, **kw)
    return multi_exit_linear_cross_entropy_reference(hs, W, targets, **kw)


__all__ = [
    "prefill_attention", "decode_attention", "write_kv_cache", "exit_head", "ExitHeadOut",
    "multi_exit_linear_cross_entropy",
    "prefill_attention_reference", "decode_attention_reference", "write_kv_cache_reference",
    "exit_head_reference", "multi_exit_linear_cross_entropy_reference",
    "prefill_attention_triton", "decode_attention_triton", "write_kv_cache_triton",
    "exit_head_triton", "multi_exit_linear_cross_entropy_triton",
    "add_rmsnorm", "rope_qkv", "silu_mul", "add_rmsnorm_reference", "rope_qkv_reference", "silu_mul_reference",
    "add_rmsnorm_triton", "rope_qkv_triton", "silu_mul_triton",
]
