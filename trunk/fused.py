"""Serving-time form of a decoder block: the same weights, fewer and fused kernels.

`fuse_block(blk)` re-points a built block's q/k/v projections at one (Hq + 2Hkv)E x D buffer and its
gate/up projections at one 2F x D buffer (the Linear modules keep working: their weights become views
of the fused buffers, so memory does not grow and training-time code is untouched). `block_step` runs
the block on packed rows with one matmul per fused projection and the elementwise work in
kernels.add_rmsnorm / rope_qkv / silu_mul:

    h, x  = add_rmsnorm(h, delta, ln1)      (delta: the previous block's MLP output, not yet added)
    q     = rope_qkv(x Wqkv^T, pos)         (k, v written into the pool at each row's slot and position)
    o     = attend(q) Wo^T
    h, x  = add_rmsnorm(h, o, ln2)
    delta = silu_mul(x Wgu^T) Wd^T

so a layer is ~9 kernels instead of ~35. At one row (batch-1 decode, CUDA) the matmuls are
kernels/gemv.py's rows kernel, which streams each weight faster than cuBLAS's GEMV, with the elementwise
work folded into the matmuls' prologues (add_rmsnorm into q/k/v and gate/up, silu_mul into down):
6 kernels a layer. The arithmetic is trunk.model.Block's: RMSNorm exactly,
RoPE and SiLU-mul rounded once instead of per product (bf16: within an ulp of the eager path).
This file changes no math of the model and knows nothing of pools' owners or requests.
Legend: N rows, D d_model, H/K query/kv heads, E head dim, F d_ff.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels


@dataclass
class FusedBlock:
    w_qkv: torch.Tensor          # ((H + 2K) E, D)
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor            # (D, H E)
    w_gu: torch.Tensor           # (2F, D)
    w_d: torch.Tensor            # (D, F)
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    n_heads: int
    n_kv: int


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One buffer holding the rows of every Linear's weight (and bias); the Linears now view into it."""
    w = torch.cat([lin.weight.data for lin in linears], dim=0)
    bias = [lin.bias for lin in linears]
    b = torch.cat([x.data for x in bias], dim=0) if all(x is not None for x in bias) else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = w[row:row + n]
        if b is not None:
            lin.bias.data = b[row:row + n]
        row += n
    return w, b


def fuse_block(blk) -> FusedBlock:
    a, m = blk.self_attn, blk.mlp
    w_qkv, b_qkv = _fuse([a.q_proj, a.k_proj, a.v_proj])
    w_gu, _ = _fuse([m.gate_proj, m.up_proj])
    return FusedBlock(w_qkv, b_qkv, a.o_proj.weight, w_gu, m.down_proj.weight, blk.input_layernorm.weight,
                      blk.post_attention_layernorm.weight, blk.input_layernorm.eps, a.n_heads, a.n_kv)


def block_step(fb: FusedBlock, h, delta, cos, sin, pos, row_slots, k_cache, v_cache, attend):
    """One block on packed rows h (N, D) with the previous block's output `delta` pending (or None).
    attend(q (N, H, E)) -> (N, H, E) reads the pool (k/v already written). Returns (h, delta)."""
    if fb.b_qkv is None:
        h, q = kernels.add_rmsnorm_qkv_rope(h, delta, fb.ln1, fb.w_qkv, pos, row_slots, cos, sin, k_cache, v_cache,
                                            eps=fb.eps, n_heads=fb.n_heads, n_kv_heads=fb.n_kv)
    else:
        h, x = kernels.add_rmsnorm(h, delta, fb.ln1, eps=fb.eps)
        qkv = F.linear(x, fb.w_qkv, fb.b_qkv)
        q = kernels.rope_qkv(qkv, pos, row_slots, cos, sin, k_cache, v_cache, n_heads=fb.n_heads, n_kv_heads=fb.n_kv)
    o = kernels.linear_1row(attend(q).flatten(-2), fb.w_o)
    h, gu = kernels.add_rmsnorm_linear(h, o, fb.ln2, fb.w_gu, eps=fb.eps)
    return h, kernels.linear_1row(gu, fb.w_d, silu=True)
