"""Skinny linear layers (kernels/gemv.py) against cuBLAS on the `1b` block's decode shapes (GPU).

For each weight shape (qkv, o, gate_up, down, the exit head at vocab 2048) and rows M, sweeps the rows
kernel's and the dot kernel's launch parameters and reports the best of each next to F.linear, in
microseconds and achieved weight bandwidth (TB/s). Also the down projection with its silu_mul prologue
fused, against silu_mul + F.linear. Writes kernels_gemv.json (+ .png) under --out.

    python3 benchmarks/kernels_gemv.py --out "$OUT"
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632), "head": (2048, 2048)}
ROWS = [dict(block_n=bn, block_k=bk, split_k=sk, num_warps=nw, num_stages=ns)
        for bn, bk, sk, nw, ns in itertools.product((4, 8, 16, 32), (256, 512, 1024), (1, 2, 4), (4,), (1, 3))]
DOTS = [dict(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=ns, dot=True)
        for bn, bk, sk, ns in itertools.product((16, 32, 64), (128, 256, 512), (1, 2, 4), (4,))]


def bench(fn, ws) -> float:
    """GPU time of one call fn(w), replayed from a CUDA graph (a decode step runs as one; plain launches
    of a ~5 us kernel measure the CPU's launch cost instead), cycling through copies `ws` of the weight
    (>= 256 MB in all) so that every call reads its weight from HBM, not from the 50 MB L2."""
    from triton.testing import do_bench_cudagraph

    def run():
        for w in ws:
            fn(w)
    run()
    return do_bench_cudagraph(run, rep=30, quantiles=[0.5]) * 1e3 / len(ws)  # us


def copies(w) -> list:
    return [w] + [w.clone() for _ in range(-(-(256 << 20) // (w.numel() * w.element_size())) - 1)]


def sweep(x, ws, configs, silu=False):
    from kernels.gemv import skinny_linear_reference, skinny_linear_triton
    w = ws[0]
    ref = skinny_linear_reference(x, w, silu).float()
    got = []
    for c in configs:
        if (w.shape[1] % (c["block_k"] * c["split_k"])) and c["split_k"] > 1:
            continue
        try:
            y = skinny_linear_triton(x, w, silu=silu, **c)
            err = (y.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
            if err > 2e-2:
                got.append({"config": c, "error": f"rel err {err:.3g}"})
                continue
            got.append({"config": c, "us": round(bench(lambda w: skinny_linear_triton(x, w, silu=silu, **c), ws), 2)})
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is skipped
            got.append({"config": c, "error": f"{type(e).__name__}: {str(e)[:120]}"})
    ok = sorted([g for g in got if "us" in g], key=lambda g: g["us"])
    return ok[:5], sum(1 for g in got if "error" in g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--rows", default="1,4,16")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton
    R = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "results": []}
    torch.manual_seed(0)
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        ws = copies(w)
        for M in [int(m) for m in args.rows.split(",")]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            nbytes = w.numel() * 2
            cub = bench(lambda w: F.linear(x, w), ws)
            row = {"shape": name, "N": N, "K": K, "M": M, "cublas_us": round(cub, 2),
                   "cublas_TBps": round(nbytes / cub / 1e6, 3)}
            if M <= 4:
                top, bad = sweep(x, ws, ROWS)
                row["rows"], row["rows_failed"] = top, bad
            top, bad = sweep(x, ws, DOTS)
            row["dot"], row["dot_failed"] = top, bad
            best = min([t["us"] for t in row.get("rows", [])[:1] + row["dot"][:1]] or [float("inf")])
            row["best_us"], row["best_TBps"] = best, round(nbytes / best / 1e6, 3)
            R["results"].append(row)
            print(name, M, "cublas", row["cublas_us"], "best", best, row["best_TBps"], "TB/s", flush=True)
            (out / "kernels_gemv.json").write_text(json.dumps(R, indent=1))
    # the down projection with silu_mul fused in front, against silu_mul + F.linear
    import kernels
    N, K = SHAPES["down"]
    ws = copies(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
    for M in (1, 2, 4):
        gu = torch.randn(M, 2 * K, device="cuda", dtype=torch.bfloat16)
        sep = bench(lambda w: F.linear(kernels.silu_mul(gu), w), ws)
        top, bad = sweep(gu, ws, ROWS, silu=True)
        R["results"].append({"shape": "silu+down", "M": M, "separate_us": round(sep, 2), "rows": top, "rows_failed": bad})
        print("silu+down", M, sep, top[:1], flush=True)
    (out / "kernels_gemv.json").write_text(json.dumps(R, indent=1))
    plot(R, out / "kernels_gemv.png")


def plot(R, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in R["results"] if "cublas_TBps" in r]
    names = sorted({r["shape"] for r in rows}, key=list(SHAPES).index)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True)
    for ax, n in zip(axes, names):
        rs = [r for r in rows if r["shape"] == n]
        ax.plot([r["M"] for r in rs], [r["cublas_TBps"] for r in rs], "o-", label="cuBLAS (F.linear)")
        ax.plot([r["M"] for r in rs], [r["best_TBps"] for r in rs], "s-", label="kernels/gemv.py (best)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n} {rs[0]['N']}x{rs[0]['K']}")
        ax.set_xlabel("rows M")
    axes[0].set_ylabel("weight bandwidth, TB/s")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Skinny linear, bf16, {R['device']} ({R['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
