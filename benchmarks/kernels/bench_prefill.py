"""Prefill attention: Triton vs F.scaled_dot_product_attention (fastest of its backends), bf16.

Sweep (issue 4): S = 512..16k, D = 64 and 128, causal and not, B*S = 16k tokens, H*D = 2048; plus
two GQA points (Hq 32, Hkv 8, D 128). TFLOP/s = 4*B*H*S^2*D / t, halved when causal.
Writes kernels_prefill.json; benchmarks/kernels/make_dispatch_table.py turns it into the dispatcher's
table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import Budget, Results, bench_ms, is_oom, rel_err  # noqa: E402  (sets sys.path)
from kernels import attention_prefill
from kernels.attention_prefill import _prefill_fwd_kernel, prefill_attention_triton

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def shapes(quick: bool):
    seqs = [512, 1024, 2048, 4096, 8192, 16384]
    out = []
    for D in (128, 64):
        for causal in (True, False):
            for S in seqs:
                out.append(dict(B=16384 // S, Hq=2048 // D, Hkv=2048 // D, S=S, D=D, causal=causal))
    out += [dict(B=16384 // S, Hq=32, Hkv=8, S=S, D=128, causal=True) for S in (2048, 8192)]
    return out


def run(out_dir: Path, budget: Budget, quick: bool = False):
    res = Results(out_dir / "kernels_prefill.json", "prefill_attention", {"dtype": "bfloat16"})
    for sh in shapes(quick):
        if budget.over():
            print("prefill: budget exhausted", flush=True)
            break
        B, Hq, Hkv, S, D, causal = sh["B"], sh["Hq"], sh["Hkv"], sh["S"], sh["D"], sh["causal"]
        q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        flops = 4 * B * Hq * S * S * D * (0.5 if causal else 1.0)
        row = dict(head_dim=D, causal=causal, seq_len=S, batch=B, heads=Hq, kv_heads=Hkv)
        # both kernels: TMA descriptors (the dense default) and pointer arithmetic
        times, outs = {}, {}
        for variant, use_tma in (("tma", True), ("pointers", False)):
            attention_prefill.USE_TMA = use_tma
            o = prefill_attention_triton(q, k, v, causal=causal)  # autotunes on first use
            times[variant] = bench_ms(lambda: prefill_attention_triton(q, k, v, causal=causal))
            row[f"triton_{variant}_tflops"] = flops / times[variant] / 1e9
            kern = attention_prefill._prefill_fwd_tma_kernel if use_tma else _prefill_fwd_kernel
            row[f"triton_{variant}_config"] = kern.best_config()
            outs[variant] = o
        attention_prefill.USE_TMA = True
        out = outs["tma"]
        ms = times["tma"]
        row["triton_ms"] = ms
        row["triton_tflops"] = flops / ms / 1e9
        best = None
        for name, be in BACKENDS.items():
            try:
                with sdpa_kernel([be]):
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv)
                    t = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                        enable_gqa=Hq != Hkv))
                row[f"sdpa_{name}_tflops"] = flops / t / 1e9
                if best is None or t < best[1]:
                    best = (name, t, ref)
            except Exception as e:  # a backend that does not support the shape
                if is_oom(e):
                    torch.cuda.empty_cache()
                row[f"sdpa_{name}_tflops"] = None
        if best:
            row["sdpa_best"] = best[0]
            row["sdpa_ms"] = best[1]
            row["sdpa_tflops"] = flops / best[1] / 1e9
            row["ratio_vs_sdpa"] = best[1] / ms
            row["rel_err_vs_sdpa"] = rel_err(out, best[2])
            row["pointers_rel_err_vs_sdpa"] = rel_err(outs["pointers"], best[2])
        res.add(row)
        del q, k, v, out, outs
        torch.cuda.empty_cache()
    return res.doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    ap.add_argument("--budget", type=float, default=300, help="seconds before the sweep stops")
    a = ap.parse_args()
    run(a.out, Budget(a.budget))
