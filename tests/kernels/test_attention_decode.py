"""Split-KV decode attention against the per-sequence SDPA reference.

Tolerances as in test_attention_prefill.py (fp32 1e-5: IEEE dots, only summation order and the
base-2 exponentials differ; fp16 5e-3: probabilities rounded to fp16 before P.V; bf16 on GPU 1e-2).
The split-KV combine adds one more fp32 rescale per chunk, far below these.
"""
from __future__ import annotations

import pytest
import torch

from kernels import attention_decode
from kernels.attention_decode import choose_splits, decode_attention_reference, decode_attention_triton
from ktest import DEVICE, rel_err


@pytest.fixture(params=["fused", "combine-kernel"])
def combine(request, monkeypatch):
    """Both ways of merging the chunks: the last program of each (sequence, kv head), or a second kernel."""
    monkeypatch.setenv("FAMILIAL_FUSED_COMBINE", "1" if request.param == "fused" else "0")
    return request.param


def _case(B, n_q, hq, hkv, D, S_max, dtype=torch.float32):
    q = torch.randn(B, n_q, hq, D, device=DEVICE, dtype=dtype)
    kc = torch.randn(B, hkv, S_max, D, device=DEVICE, dtype=dtype)
    vc = torch.randn(B, hkv, S_max, D, device=DEVICE, dtype=dtype)
    return q, kc, vc


def _ref(q, kc, vc, lens, **kw):
    return decode_attention_reference(q.float(), kc.float(), vc.float(), lens, **kw)


@pytest.mark.parametrize("n_q", [1, 3, 8])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_ragged_lengths_gqa(n_q, ratio, combine):
    lens = torch.tensor([9, 41, 341, n_q], device=DEVICE)
    q, kc, vc = _case(4, n_q, 8, 8 // ratio, 64, 352)
    out = decode_attention_triton(q, kc, vc, lens)
    assert rel_err(out, _ref(q, kc, vc, lens)) < 1e-5


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_fixed_split_counts_agree(splits, combine):
    # More chunks than blocks leaves some chunks empty (lse = -inf): the combine must ignore them.
    lens = torch.tensor([41, 5], device=DEVICE)
    q, kc, vc = _case(2, 2, 4, 2, 32, 64)
    for _ in range(2):  # the fused combine's arrival counters are left at zero for the next launch
        out = decode_attention_triton(q, kc, vc, lens, num_splits=splits)
        assert rel_err(out, _ref(q, kc, vc, lens)) < 1e-5
    if combine == "fused" and splits > 1:
        assert int(attention_decode._LOCKS[q.device].abs().sum()) == 0


def test_long_cache_head_dim_128_fp16():
    lens = torch.tensor([4231], device=DEVICE)
    q, kc, vc = _case(1, 1, 8, 2, 128, 4231, torch.float16)
    out = decode_attention_triton(q, kc, vc, lens)
    assert out.dtype == torch.float16
    assert rel_err(out, _ref(q, kc, vc, lens)) < 5e-3


def test_cache_slots_and_empty_sequence():
    lens = torch.tensor([0, 17, 9], device=DEVICE)
    slots = torch.tensor([1, 2, 0], device=DEVICE)
    q, kc, vc = _case(3, 1, 4, 4, 32, 32)
    out = decode_attention_triton(q, kc, vc, lens, cache_slots=slots)
    ref = _ref(q, kc, vc, lens, cache_slots=slots)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no keys: zero, not NaN
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("B,lens", [(1, [23]), (3, [23, 23, 23]), (3, [23, 5, 23])])
def test_reference_paths_against_explicit_softmax(B, lens):
    """The reference's three ways (one sequence: a view of its slot, no mask; equal lengths: no mask;
    ragged: masked) against softmax(q k^T / sqrt(D)) v written out per sequence and head."""
    lens_t = torch.tensor(lens)
    slots = torch.tensor([2, 0, 1][:B])
    q = torch.randn(B, 1, 4, 16)
    kc, vc = torch.randn(3, 2, 32, 16), torch.randn(3, 2, 32, 16)
    out = decode_attention_reference(q, kc, vc, lens_t, cache_slots=slots)
    for b in range(B):
        k, v = kc[slots[b], :, :lens[b]], vc[slots[b], :, :lens[b]]          # (Hkv, L, D)
        for h in range(4):
            p = torch.softmax(q[b, 0, h] @ k[h // 2].T / 4.0, dim=-1)            # query head h reads kv head h // 2
            assert rel_err(out[b, 0, h], p @ v[h // 2]) < 1e-5


def test_split_count_depends_on_shapes_only():
    assert 1 <= choose_splits(128, 32, 1024) <= choose_splits(1, 8, 65536)
    assert choose_splits(1, 8, 100) == 1  # a short cache is never cut below 128 keys per chunk


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("n_q", [1, 8])
def test_bf16_gpu(ratio, n_q):
    lens = torch.tensor([4231, 16384, 1, 777], device=DEVICE)
    q, kc, vc = _case(4, n_q, 32, 32 // ratio, 128, 16384, torch.bfloat16)
    out = decode_attention_triton(q, kc, vc, lens)
    assert rel_err(out, _ref(q, kc, vc, lens)) < 1e-2


@pytest.mark.gpu
def test_fused_combine_many_launches_gpu(combine):
    """The last-program merge relies on the GPU's memory ordering across SMs: many launches at random
    lengths with every chunk count, each checked (a missed or stale partial shows as a large error)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, hq, hkv, D, S = 16, 32, 4, 64, 2048
    q, kc, vc = _case(B, 1, hq, hkv, D, S, torch.bfloat16)
    for i in range(60):
        lens = torch.randint(1, S + 1, (B,), generator=g).to(DEVICE)
        out = decode_attention_triton(q, kc, vc, lens, num_splits=[2, 5, 16, 33, 64][i % 5])
        assert rel_err(out, _ref(q, kc, vc, lens)) < 1e-2, i


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_lengths(combine):
    """Captured once, replayed after the lengths (and cache contents) change in place."""
    B, hq, hkv, D, S = 8, 32, 8, 128, 4096
    q, kc, vc = _case(B, 1, hq, hkv, D, S, torch.bfloat16)
    lens = torch.full((B,), 100, device=DEVICE, dtype=torch.int32)
    out = decode_attention_triton(q, kc, vc, lens)  # warm-up compiles outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention_triton(q, kc, vc, lens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, kc, vc, lens)
    for new in ([4096] * B, [1, 9, 41, 341, 4096, 2000, 3000, 17]):
        lens.copy_(torch.tensor(new, device=DEVICE, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, _ref(q, kc, vc, lens)) < 1e-2
