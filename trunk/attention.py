"""The one attention entry point the model calls, for training and for serving with a KV cache.

`attend` takes queries for positions [start, start+T) and keys/values for positions [0, start+T) and
applies causal masking across that offset. On CPU (and whenever the kernels say so) it is PyTorch's
scaled_dot_product_attention; on CUDA `kernels/` supplies fused Triton paths. RoPE, projections and
cache bookkeeping happen in `trunk/model.py`, not here.

Legend: B batch, H query heads, K kv heads, T new positions, S all key positions, E head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels


def attend(q_BHTE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor, start: int) -> torch.Tensor:
    """Causal grouped-query attention of T queries (positions start..start+T-1) over S = start+T keys."""
    if q_BHTE.is_cuda and not torch.compiler.is_compiling():  # compiled graphs keep SDPA (no breaks)
        return _attend_cuda(q_BHTE, k_BKSE, v_BKSE)
    T, S = q_BHTE.shape[2], k_BKSE.shape[2]
    H, K = q_BHTE.shape[1], k_BKSE.shape[1]
    gqa = H != K
    if T == S:  # no cached prefix: plain causal
        return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, is_causal=True, enable_gqa=gqa)
    if T == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, enable_gqa=gqa)
    q_pos = torch.arange(start, start + T, device=q_BHTE.device)
    k_pos = torch.arange(S, device=q_BHTE.device)
    mask_TS = k_pos[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, attn_mask=mask_TS, enable_gqa=gqa)


def _attend_cuda(q_BHTE, k_BKSE, v_BKSE):
    """kernels/: 1..8 new tokens over a cache -> split-KV decode; otherwise prefill attention, which
    itself picks SDPA when autograd needs a graph or SDPA measured faster for the shape
    (kernels/dispatch.py). Both align the T queries to the last T of the S keys, as above."""
    T, S = q_BHTE.shape[2], k_BKSE.shape[2]
    if T <= 8 and S > T and not (torch.is_grad_enabled() and q_BHTE.requires_grad):
        lens_B = torch.full((q_BHTE.shape[0],), S, dtype=torch.int32, device=q_BHTE.device)
        y_BTHE = kernels.decode_attention(q_BHTE.transpose(1, 2), k_BKSE, v_BKSE, lens_B)
        return y_BTHE.transpose(1, 2)
    return kernels.prefill_attention(q_BHTE, k_BKSE, v_BKSE, causal=True)
