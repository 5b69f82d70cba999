"""Multi-exit linear + cross-entropy, forward + backward: time and peak memory vs eager and compile.

Sweep (issue 4): BT in {4k, 8k, 16k, 32k} rows, H 4096, V 128256, bf16, exits G in {1, 2, 4}
sharing one (tied) unembedding, uniform exit weights. The baseline is what the trunk did before:
per exit F.linear -> .float() -> F.cross_entropy, weighted sum, backward. Peak extra memory = peak
allocated during forward + backward minus what was allocated before (inputs), so it includes the
gradients of h and W on every path. torch.compile: the same function, rows dynamic.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from common import Budget, Results, bench_ms, is_oom, peak_extra_bytes, rel_err
from kernels.linear_ce import multi_exit_linear_cross_entropy_triton

H, V = 4096, 128256


def eager_loss(hs, W, y):
    G = len(hs)
    return sum(F.cross_entropy(F.linear(h, W).float(), y) for h in hs) / G


def shapes():
    # the targets (BT 8k) first, then the rest of the grid; FAMILIAL_BENCH_CE_ROWS=4096,8192 narrows it
    grid = [(8192, 1), (8192, 2), (8192, 4), (4096, 1), (4096, 2), (4096, 4),
            (16384, 1), (16384, 2), (16384, 4), (32768, 1), (32768, 2), (32768, 4)]
    rows = os.environ.get("FAMILIAL_BENCH_CE_ROWS")
    return [s for s in grid if not rows or str(s[0]) in rows.split(",")]


def _fwd_bwd(fn, hs, W, y):
    def step():
        loss = fn(hs, W, y)
        loss.backward()
        return loss
    return step


def run(out_dir: Path, budget: Budget, quick: bool = False, with_compile: bool = True):
    res = Results(out_dir / "kernels_linear_ce.json", "multi_exit_linear_cross_entropy",
                  {"dtype": "bfloat16", "hidden": H, "vocab": V})
    compiled = {}
    ours = lambda hs, W, y: multi_exit_linear_cross_entropy_triton(hs, W, y)  # noqa: E731
    for BT, G in shapes():
        if budget.over():
            print("linear_ce: budget exhausted", flush=True)
            break
        hs = [(torch.randn(BT, H, device="cuda") * 2).to(torch.bfloat16).requires_grad_() for _ in range(G)]
        W = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
        y = torch.randint(0, V, (BT,), device="cuda")
        params = hs + [W]
        row = dict(rows=BT, exits=G)
        impls = [("triton", ours), ("eager", eager_loss)]
        if with_compile and budget.left() > 90:
            fn = compiled.get(G)
            if fn is None:
                fn = compiled[G] = torch.compile(eager_loss, dynamic=True)
            impls.append(("compile", fn))
        losses, ref_grad = {}, None
        for name, fn in impls:
            step = _fwd_bwd(fn, hs, W, y)
            try:
                for p in params:
                    p.grad = None
                losses[name] = step().detach().float()
                if name == "triton":
                    ref_grad = [p.grad.clone() for p in params]
                elif name == "eager" and ref_grad is not None:
                    row["grad_rel_err_vs_eager"] = max(rel_err(a, p.grad) for a, p in zip(ref_grad, params))
                row[f"{name}_ms"] = bench_ms(step, warmup=1, rep=200, grad_to_none=params)
                for p in params:
                    p.grad = None
                row[f"{name}_peak_bytes"] = peak_extra_bytes(step)
            except Exception as e:
                if not is_oom(e):
                    row[f"{name}_error"] = repr(e)[:300]
                else:
                    row[f"{name}_ms"] = "oom"
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
        if "eager" in losses and "triton" in losses:
            row["loss_rel_err_vs_eager"] = abs(float(losses["triton"] - losses["eager"])) / float(losses["eager"])
        for k in ("eager", "compile"):
            if isinstance(row.get(f"{k}_ms"), float):
                row[f"time_ratio_vs_{k}"] = row["triton_ms"] / row[f"{k}_ms"]
                row[f"mem_frac_of_{k}"] = row["triton_peak_bytes"] / max(1, row[f"{k}_peak_bytes"])
        res.add(row)
        del hs, W, y, params, ref_grad
        torch.cuda.empty_cache()
    return res.doc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    ap.add_argument("--budget", type=float, default=300, help="seconds before the sweep stops")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    a = ap.parse_args()
    run(a.out, Budget(a.budget), with_compile=not a.no_compile)
