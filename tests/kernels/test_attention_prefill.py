"""Prefill attention: Triton (interpreter on CPU) against the SDPA reference.

Tolerances (relative Frobenius error against the reference run in fp32 on the same inputs):
  fp32: 1e-5. Everything is fp32 and the dots are IEEE (input_precision="ieee"); what is left is
        summation order and exp2 vs exp, ~1e-7.
  fp16: 5e-3. The probabilities are rounded to fp16 before the P.V product (as in FlashAttention),
        a relative error of 2^-11 per term, ~5e-4 on the output; 10x margin.
  bf16 (GPU only: the interpreter's bf16 dot is wrong): 2^-8 per rounded probability, ~4e-3; the
        test also bounds it by twice SDPA's own bf16 error.
"""
from __future__ import annotations

import pytest
import torch

from kernels import attention_prefill
from kernels.attention_prefill import (prefill_attention_reference, prefill_attention_triton,
                                       write_kv_cache_reference, write_kv_cache_triton)
from ktest import DEVICE, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def _qkv(B, hq, hkv, T, S, D, dtype, varlen_lens=None):
    if varlen_lens is not None:
        N = sum(varlen_lens)
        return (torch.randn(N, hq, D, device=DEVICE, dtype=dtype), torch.randn(N, hkv, D, device=DEVICE, dtype=dtype),
                torch.randn(N, hkv, D, device=DEVICE, dtype=dtype))
    return (torch.randn(B, hq, T, D, device=DEVICE, dtype=dtype), torch.randn(B, hkv, S, D, device=DEVICE, dtype=dtype),
            torch.randn(B, hkv, S, D, device=DEVICE, dtype=dtype))


def _ref(q, k, v, **kw):
    return prefill_attention_reference(q.float(), k.float(), v.float(), **kw)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("T", [9, 41])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_padded_gqa_odd_lengths(causal, ratio, T, tma, monkeypatch):
    # dense batches take the TMA-descriptor kernel; the pointer kernel must give the same answer
    monkeypatch.setattr(attention_prefill, "USE_TMA", tma)
    q, k, v = _qkv(2, 8, 8 // ratio, T, T, 64, torch.float32)
    out = prefill_attention_triton(q, k, v, causal=causal)
    assert rel_err(out, _ref(q, k, v, causal=causal)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_tail_head_dim_128(dtype):
    # 341 = 10 full 32-blocks + a tail of 21: the unmasked loop, the diagonal and the tail all run.
    q, k, v = _qkv(1, 4, 1, 341, 341, 128, dtype)
    out = prefill_attention_triton(q, k, v, causal=True)
    assert out.dtype == dtype
    assert rel_err(out, _ref(q, k, v, causal=True)) < TOL[dtype]


def test_fewer_queries_than_keys_bottom_right():
    # T < S without a cache: queries are the last T positions (the prefix is visible to all).
    q, k, v = _qkv(2, 4, 2, 9, 41, 64, torch.float32)
    for causal in (True, False):
        out = prefill_attention_triton(q, k, v, causal=causal)
        assert rel_err(out, _ref(q, k, v, causal=causal)) < TOL[torch.float32]


def test_query_with_no_visible_key_is_zero():
    q, k, v = _qkv(1, 2, 2, 41, 9, 32, torch.float32)  # S < T: the first 32 queries see nothing
    out = prefill_attention_triton(q, k, v, causal=True)
    ref = _ref(q, k, v, causal=True)
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32]))
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("ratio", [1, 4])
def test_ragged_batch_cu_seqlens(ratio):
    lens = [9, 41, 1, 77]
    cu = torch.tensor([0, 9, 50, 51, 128], device=DEVICE, dtype=torch.int32)
    q, k, v = _qkv(None, 8, 8 // ratio, None, None, 64, torch.float32, varlen_lens=lens)
    for causal in (True, False):
        out = prefill_attention_triton(q, k, v, causal=causal, cu_seqlens=cu)
        assert rel_err(out, _ref(q, k, v, causal=causal, cu_seqlens=cu)) < TOL[torch.float32]


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("with_slots", [False, True])
def test_cache_write_and_attend_to_prefix(varlen, with_slots):
    """New tokens go to cache[slot, :, off:off+len]; queries see the cached prefix + themselves."""
    B, hq, hkv, D, S_max = 3, 8, 2, 64, 160
    offs = torch.tensor([0, 17, 100], device=DEVICE)
    slots = torch.tensor([2, 0, 1], device=DEVICE) if with_slots else None
    if varlen:
        lens = [9, 41, 5]
        cu = torch.tensor([0, 9, 50, 55], device=DEVICE)
        q, k, v = _qkv(None, hq, hkv, None, None, D, torch.float32, varlen_lens=lens)
    else:
        cu = None
        q, k, v = _qkv(B, hq, hkv, 41, 41, D, torch.float32)
    kc = torch.randn(B, hkv, S_max, D, device=DEVICE)
    vc = torch.randn(B, hkv, S_max, D, device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kw = dict(causal=True, cu_seqlens=cu, cache_offsets=offs, cache_slots=slots)
    out = prefill_attention_triton(q, k, v, k_cache=kc, v_cache=vc, **kw)
    ref = prefill_attention_reference(q, k, v, k_cache=kc_ref, v_cache=vc_ref, **kw)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), "cache contents differ"
    assert rel_err(out, ref) < TOL[torch.float32]


def test_write_kv_cache_leaves_other_positions():
    kc = torch.randn(2, 2, 64, 32, device=DEVICE)
    vc = torch.randn(2, 2, 64, 32, device=DEVICE)
    before = kc.clone()
    k = torch.randn(2, 2, 9, 32, device=DEVICE)
    v = torch.randn(2, 2, 9, 32, device=DEVICE)
    offs = torch.tensor([3, 55], device=DEVICE)  # the second write ends exactly at S_max
    kc2, vc2 = kc.clone(), vc.clone()
    write_kv_cache_triton(kc, vc, k, v, offs)
    write_kv_cache_reference(kc2, vc2, k, v, offs)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(kc[0, :, :3], before[0, :, :3]) and torch.equal(kc[0, :, 12:], before[0, :, 12:])


@pytest.mark.parametrize("B", [1, 3])
def test_decode_step_writes_against_the_kernel(B):
    """One packed row per sequence at its offset and slot (a decode step; B = 1 is the CPU's plain-indexing
    path), and a write past the cache's end refused."""
    kc = torch.randn(4, 2, 16, 32, device=DEVICE)
    vc = torch.randn(4, 2, 16, 32, device=DEVICE)
    k, v = torch.randn(B, 2, 32, device=DEVICE), torch.randn(B, 2, 32, device=DEVICE)
    cu = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
    offs, slots = torch.tensor([15, 0, 7][:B], device=DEVICE), torch.tensor([2, 0, 3][:B], device=DEVICE)
    kw = dict(cu_seqlens=cu, cache_slots=slots, max_seqlen=1)
    kc2, vc2 = kc.clone(), vc.clone()
    write_kv_cache_triton(kc, vc, k, v, offs, **kw)
    write_kv_cache_reference(kc2, vc2, k, v, offs, **kw)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(kc2[2, :, 15], k[0]) and torch.equal(vc2[2, :, 15], v[0])
    with pytest.raises(ValueError, match="exceed"):
        write_kv_cache_reference(kc2, vc2, k, v, offs + 1, **kw)


def test_strided_views_are_read_in_place():
    # q as a transpose view (B, T, H, D) -> (B, H, T, D), like the model's projections
    qt = torch.randn(2, 41, 4, 64, device=DEVICE)
    kt = torch.randn(2, 41, 2, 64, device=DEVICE)
    vt = torch.randn(2, 41, 2, 64, device=DEVICE)
    q, k, v = qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)
    out = prefill_attention_triton(q, k, v, causal=True)
    assert rel_err(out, _ref(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ratio", [1, 8])
def test_bf16_gpu(D, causal, ratio):
    import torch.nn.functional as F
    q, k, v = _qkv(2, 16, 16 // ratio, 4231, 4231, D, torch.bfloat16)
    ref = _ref(q, k, v, causal=causal)
    out = prefill_attention_triton(q, k, v, causal=causal)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=ratio > 1)
    assert rel_err(out, ref) < max(2 * rel_err(sdpa, ref), 1e-2)


@pytest.mark.gpu
def test_bf16_gpu_ragged_cache():
    lens = [4231, 9, 341, 1000]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEVICE)
    q, k, v = _qkv(None, 32, 8, None, None, 128, torch.bfloat16, varlen_lens=lens)
    kc = torch.randn(4, 8, 6000, 128, device=DEVICE, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    offs = torch.tensor([0, 1000, 17, 4999], device=DEVICE)
    kc_ref, vc_ref = kc.float(), vc.float()  # the reference runs in fp32 on its own copy
    kw = dict(causal=True, cu_seqlens=cu, cache_offsets=offs)
    out = prefill_attention_triton(q, k, v, k_cache=kc, v_cache=vc, **kw)
    ref = prefill_attention_reference(q.float(), k.float(), v.float(), k_cache=kc_ref, v_cache=vc_ref, **kw)
    assert torch.equal(kc.float(), kc_ref) and torch.equal(vc.float(), vc_ref)
    assert rel_err(out, ref) < 1e-2
