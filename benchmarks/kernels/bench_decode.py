"""Decode attention: bandwidth of the K/V read, Triton split-KV vs SDPA, both in CUDA graphs.

Sweep (issue 4): Hq 32, D 128, bf16, Hkv in {8, 32}, B in {1, 8, 32, 128}, cache 1k..64k (uniform
lengths so SDPA can run the batch in one call), one query token; plus n_q = 8 (draft verification)
at B 8. GB/s = bytes of K and V read (2*B*Hkv*L*D*2) / time, compared with the measured device copy
bandwidth (bytes read + written). Shapes whose cache would exceed ~34 GB are skipped (80 GB card).
Inputs rotate over several cache copies so that small caches are not timed out of L2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import Budget, Results, bench_graph_ms, copy_bandwidth_gbs, is_oom, n_copies, rel_err
from kernels.attention_decode import _decode_split_kernel, choose_splits, decode_attention_triton

MAX_CACHE_BYTES = 34.5e9
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def shapes():
    out = []
    for hkv in (8, 32):
        for L in (16384, 65536, 4096, 1024):  # the target lengths (>= 16k) first
            for B in (1, 8, 32, 128):
                out.append(dict(B=B, hkv=hkv, L=L, n_q=1))
    out.append(dict(B=8, hkv=8, L=16384, n_q=8))
    return out


def run(out_dir: Path, budget: Budget, quick: bool = False):
    copy = copy_bandwidth_gbs()
    res = Results(out_dir / "kernels_decode.json", "decode_attention",
                  {"dtype": "bfloat16", "heads": 32, "head_dim": 128, "copy_gbs": copy})
    print(f"device copy bandwidth {copy:.0f} GB/s", flush=True)
    Hq, D = 32, 128
    for sh in shapes():
        if budget.over():
            print("decode: budget exhausted", flush=True)
            break
        B, hkv, L, n_q = sh["B"], sh["hkv"], sh["L"], sh["n_q"]
        kv_bytes = 2 * B * hkv * L * D * 2
        row = dict(batch=B, kv_heads=hkv, cache_len=L, n_q=n_q, kv_bytes=kv_bytes)
        if kv_bytes > MAX_CACHE_BYTES:
            row["skipped"] = "cache larger than the benchmark's memory cap"
            res.add(row)
            continue
        c = n_copies(kv_bytes)
        try:
            caches = [(torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16),
                       torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16)) for _ in range(c)]
        except Exception as e:
            if not is_oom(e):
                raise
            row["skipped"] = "out of memory"
            res.add(row)
            torch.cuda.empty_cache()
            continue
        q = torch.randn(B, n_q, Hq, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
        fns = [lambda kc=kc, vc=vc: decode_attention_triton(q, kc, vc, lens) for kc, vc in caches]
        out = fns[0]()
        ms = bench_graph_ms(fns)
        row.update(splits=choose_splits(B, hkv, L), copies=c, triton_ms=ms, triton_gbs=kv_bytes / ms / 1e6,
                   triton_config=_decode_split_kernel.best_config())
        row["triton_frac_of_copy"] = row["triton_gbs"] / copy
        if B == 1:  # the split count is the one free knob at batch 1: record its neighbours
            P = row["splits"]
            for alt in sorted({max(1, P // 2), 2 * P}):
                f = [lambda kc=kc, vc=vc, a=alt: decode_attention_triton(q, kc, vc, lens, num_splits=a)
                     for kc, vc in caches]
                f[0]()
                row[f"triton_splits{alt}_gbs"] = kv_bytes / bench_graph_ms(f) / 1e6
        # SDPA: q (B, Hq, n_q, D) over the whole cache; causal among the n_q new tokens is
        # bottom-right, which SDPA's is_causal is not, so n_q > 1 uses an explicit mask.
        qs = q.transpose(1, 2)
        mask = None
        if n_q > 1:
            i = torch.arange(n_q, device="cuda")[:, None]
            mask = torch.arange(L, device="cuda")[None, :] <= (L - n_q) + i
        try:  # PyTorch's own choice of backend
            f = [lambda kc=kc, vc=vc: F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask, enable_gqa=hkv != Hq)
                 for kc, vc in caches]
            f[0]()
            row["sdpa_default_gbs"] = kv_bytes / bench_graph_ms(f) / 1e6
        except Exception as e:
            row["sdpa_default_gbs"] = None
            if is_oom(e):
                torch.cuda.empty_cache()
        best = None
        for name, be in BACKENDS.items():
            try:
                with sdpa_kernel([be]):
                    f = [lambda kc=kc, vc=vc: F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask,
                                                                            enable_gqa=hkv != Hq)
                         for kc, vc in caches]
                    ref = f[0]()
                    t = bench_graph_ms(f)
                row[f"sdpa_{name}_gbs"] = kv_bytes / t / 1e6
                if best is None or t < best[1]:
                    best = (name, t, ref)
            except Exception as e:
                if is_oom(e):
                    torch.cuda.empty_cache()
                row[f"sdpa_{name}_gbs"] = None
        if best:
            row.update(sdpa_best=best[0], sdpa_ms=best[1], sdpa_gbs=kv_bytes / best[1] / 1e6,
                       ratio_vs_sdpa=best[1] / ms, rel_err_vs_sdpa=rel_err(out, best[2].transpose(1, 2)))
        res.add(row)
        del caches, q, out
        torch.cuda.empty_cache()
    return res.doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    ap.add_argument("--budget", type=float, default=300, help="seconds before the sweep stops")
    a = ap.parse_args()
    run(a.out, Budget(a.budget))
