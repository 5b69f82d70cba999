"""Fused exit head vs eager PyTorch and torch.compile: time and peak temporary memory, bf16.

The baseline computes what serving needs from an exit: RMSNorm, logits = x W^T, softmax, the max
probability and its token, entropy and logsumexp (no sampling: temperature 0 on every path).
Sweep (issue 4): rows {1, 8, 64, 256, 4k, 16k} at H 4096, V 128256 (the targets), plus rows
{1, 64, 4k} at the other (H, V) pairs of {2048, 4096} x {32000, 128256, 151936}. For rows <= 256
also GB/s of the weight read (V*H*2 bytes / time, timed as CUDA-graph replays as a serving decode
step runs; the plain Python-launched time is recorded too) against the measured copy bandwidth.
torch.compile runs with the row dimension dynamic (one compilation per (H, V)).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from common import Budget, Results, bench_graph_ms, bench_ms, copy_bandwidth_gbs, is_oom, peak_extra_bytes
from kernels.exit_head import _partial_large, _partial_small, exit_head_triton

EPS = 1e-5


def eager_exit_head(h, w, W):
    x32 = h.float()
    x = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)
    z = torch.nn.functional.linear(x, W).float()  # (N, V)
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    max_prob, token = p.max(-1)
    entropy = lse - (p * z).sum(-1)
    return token, max_prob, entropy, lse


def shapes():
    out = [dict(N=n, H=4096, V=128256) for n in (1, 8, 64, 256, 4096, 16384)]
    for H, V in ((2048, 32000), (2048, 128256), (2048, 151936), (4096, 32000), (4096, 151936)):
        out += [dict(N=n, H=H, V=V) for n in (1, 64, 4096)]
    keep = os.environ.get("FAMILIAL_BENCH_EXIT_SHAPES")  # e.g. "4096x151936" reruns one (H, V) pair
    return [s for s in out if not keep or f"{s['H']}x{s['V']}" in keep.split(",")]


def run(out_dir: Path, budget: Budget, quick: bool = False, with_compile: bool = True):
    copy = copy_bandwidth_gbs()
    res = Results(out_dir / "kernels_exit_head.json", "exit_head", {"dtype": "bfloat16", "copy_gbs": copy})
    compiled = {}
    for sh in shapes():
        if budget.over():
            print("exit_head: budget exhausted", flush=True)
            break
        N, H, V = sh["N"], sh["H"], sh["V"]
        h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16) * 2
        w = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16)
        W = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16)
        row = dict(rows=N, hidden=H, vocab=V, weight_bytes=V * H * 2)
        out = exit_head_triton(h, w, W, eps=EPS)
        row["triton_ms"] = bench_ms(lambda: exit_head_triton(h, w, W, eps=EPS))
        row["triton_config"] = (_partial_small if N <= 64 else _partial_large).best_config()
        row["triton_peak_bytes"] = peak_extra_bytes(lambda: exit_head_triton(h, w, W, eps=EPS))
        if N <= 256:
            # Decode-sized calls are host-bound when launched one by one from Python (a serving
            # step runs them inside a CUDA graph): time both, report the graph numbers as GB/s.
            nbytes = V * H * 2 + N * H * 2
            row["triton_graph_ms"] = bench_graph_ms([lambda: exit_head_triton(h, w, W, eps=EPS)], reps_per_graph=10)
            row["triton_gbs"] = nbytes / row["triton_graph_ms"] / 1e6
            row["triton_frac_of_copy"] = row["triton_gbs"] / copy
            row["triton_nograph_gbs"] = nbytes / row["triton_ms"] / 1e6
            try:
                row["eager_graph_ms"] = bench_graph_ms([lambda: eager_exit_head(h, w, W)], reps_per_graph=10)
                row["eager_graph_gbs"] = nbytes / row["eager_graph_ms"] / 1e6
            except Exception as e:
                row["eager_graph_error"] = repr(e)[:200]
        try:
            ref = eager_exit_head(h, w, W)
            row["eager_ms"] = bench_ms(lambda: eager_exit_head(h, w, W))
            row["eager_peak_bytes"] = peak_extra_bytes(lambda: eager_exit_head(h, w, W))
            row["token_agree"] = float((ref[0] == out.token).float().mean())
            row["max_abs_err_lse"] = float((ref[3] - out.lse).abs().max())
            row["max_abs_err_entropy"] = float((ref[2] - out.entropy).abs().max())
            del ref
        except Exception as e:
            if not is_oom(e):
                raise
            row["eager_ms"] = "oom"
        torch.cuda.empty_cache()
        if with_compile and budget.left() > 60:
            try:
                fn = compiled.get((H, V))
                if fn is None:
                    fn = compiled[(H, V)] = torch.compile(eager_exit_head, dynamic=True)
                fn(h, w, W)
                row["compile_ms"] = bench_ms(lambda: fn(h, w, W))
                row["compile_peak_bytes"] = peak_extra_bytes(lambda: fn(h, w, W))
            except Exception as e:
                if not is_oom(e):
                    row["compile_error"] = repr(e)[:300]
                else:
                    row["compile_ms"] = "oom"
            torch.cuda.empty_cache()
        for k in ("eager", "compile"):
            if isinstance(row.get(f"{k}_ms"), float):
                row[f"speedup_vs_{k}"] = row[f"{k}_ms"] / row["triton_ms"]
                row[f"temp_frac_of_{k}"] = row["triton_peak_bytes"] / max(1, row[f"{k}_peak_bytes"])
        res.add(row)
        del h, w, W, out
        torch.cuda.empty_cache()
    return res.doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    ap.add_argument("--budget", type=float, default=300, help="seconds before the sweep stops")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    a = ap.parse_args()
    run(a.out, Budget(a.budget), with_compile=not a.no_compile)
