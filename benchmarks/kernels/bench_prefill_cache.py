"""Prefill over a cached prefix (chunked prefill / a relay tier catching up on pending positions).

T new tokens per sequence attend to P cached positions plus themselves. Triton: write the new K/V
into the cache and attend from it (kernels.prefill_attention with k_cache). Baseline, what the
trunk did before: copy the new K/V into the cache buffer, then SDPA over the P + T positions with
an explicit boolean mask (bottom-right causal; SDPA's is_causal is top-left when T != S).
Hq 32, Hkv 8, D 128, bf16. TFLOP/s counts the visible score entries: 4*B*Hq*D*(T*P + T*(T+1)/2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common import Budget, Results, bench_ms, rel_err
from kernels.attention_prefill import prefill_attention_triton

HQ, HKV, D = 32, 8, 128


def shapes():
    return [(1, 512, 4096), (1, 512, 16384), (1, 2048, 16384), (8, 512, 4096), (4, 2048, 8192), (1, 16, 32768)]


def run(out_dir: Path, budget: Budget, quick: bool = False):
    res = Results(out_dir / "kernels_prefill_cache.json", "prefill_attention_with_cache",
                  {"dtype": "bfloat16", "heads": HQ, "kv_heads": HKV, "head_dim": D})
    for B, T, P in shapes():
        if budget.over():
            print("prefill_cache: budget exhausted", flush=True)
            break
        S = P + T
        kc = torch.randn(B, HKV, S + 64, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(B, HQ, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        offs = torch.full((B,), P, device="cuda", dtype=torch.int32)
        mask = torch.arange(S, device="cuda")[None, :] <= (P + torch.arange(T, device="cuda")[:, None])

        def ours():
            return prefill_attention_triton(q, k, v, causal=True, k_cache=kc, v_cache=vc, cache_offsets=offs)

        def sdpa():
            kc[:, :, P:S] = k
            vc[:, :, P:S] = v
            return F.scaled_dot_product_attention(q, kc[:, :, :S], vc[:, :, :S], attn_mask=mask, enable_gqa=True)

        out, ref = ours(), sdpa()
        flops = 4 * B * HQ * D * (T * P + T * (T + 1) / 2)
        row = dict(batch=B, new_tokens=T, cached=P, rel_err_vs_sdpa=rel_err(out, ref))
        row["triton_ms"] = bench_ms(ours)
        row["sdpa_mask_ms"] = bench_ms(sdpa)
        row["triton_tflops"] = flops / row["triton_ms"] / 1e9
        row["sdpa_mask_tflops"] = flops / row["sdpa_mask_ms"] / 1e9
        row["speedup_vs_sdpa_mask"] = row["sdpa_mask_ms"] / row["triton_ms"]
        res.add(row)
        del kc, vc, q, k, v, out, ref
        torch.cuda.empty_cache()
    return res.doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    ap.add_argument("--budget", type=float, default=120, help="seconds before the sweep stops")
    a = ap.parse_args()
    run(a.out, Budget(a.budget))
