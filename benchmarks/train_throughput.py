"""Training throughput of the family trainer's step: tokens/s and MFU for ~100M and ~1B presets, G in {1, 4}.

Runs the trainer's own pieces (trunk.train: FamilyLossModule around trunk.loss.family_loss, make_optimizer,
bf16 autocast, gradient clipping, AdamW step) on random tokens, so data loading is not measured.
MFU = flops_per_token(cfg, seq_len) * tokens/s / peak, with trunk.flops' "full" convention
(matmuls + Chinchilla attention + every exit head). Peak: H100 SXM bf16 dense 989 TFLOP/s; also
reported against the measured bf16 matmul rate on the lent H100 (739-798 TFLOP/s, DESIGN.md / KINDS.md).

    PYTHONPATH=. python3 benchmarks/train_throughput.py --out benchmarks/results [--compile on|off|both]

Writes <out>/train_throughput.json and <out>/train_throughput.png and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from trunk.config import get_preset
from trunk.flops import flops_per_token, param_counts
from trunk.model import FamilyModel
from trunk.train import TrainConfig, FamilyLossModule, make_optimizer

PEAK_BF16 = 989e12            # H100 SXM dense bf16 (datasheet)
MEASURED_MATMUL = (739e12, 798e12)  # 8192^3 bf16 matmul on the lent H100 (DESIGN.md, KINDS.md)
DATE = "2026-11-23"


def configs(args):
    out = []
    for preset, batch in (("100m", args.batch_100m), ("1b", args.batch_1b)):
        for G in (1, 4):
            cfg = get_preset(preset)
            if G == 1:
                cfg = cfg.replace(exit_layers=())
            assert cfg.G == G, (preset, cfg.exit_layers)
            out.append((preset, G, batch, cfg))
    return out


def bench_one(cfg, batch: int, seq_len: int, steps: int, warmup: int, compile_: bool, device) -> dict:
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 1B CPU init takes longer than the run
        model = FamilyModel(cfg)
    tcfg = TrainConfig(lr=1e-4, min_lr=1e-5, grad_clip=1.0)
    opt = make_optimizer(model, tcfg)
    net = FamilyLossModule(model, None)
    if compile_:
        net = torch.compile(net)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = net(inp, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / steps
    tok_s = batch * seq_len / sec
    fpt = flops_per_token(cfg, seq_len)
    pc = param_counts(cfg)
    res = {
        "preset": None, "G": cfg.G, "exit_layers": list(cfg.exit_layers), "compile": compile_,
        "batch": batch, "seq_len": seq_len, "N": pc.non_embedding, "N_total": pc.total,
        "step_ms": sec * 1e3, "tokens_per_s": tok_s, "flops_per_token": fpt,
        "tflops": fpt * tok_s / 1e12, "mfu": fpt * tok_s / PEAK_BF16,
        "frac_of_measured_matmul": [fpt * tok_s / m for m in MEASURED_MATMUL],
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s,
        "final_loss": float(loss),
    }
    del model, opt, net
    torch.cuda.empty_cache()
    return res


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['preset']} G={r['G']}{' c' if r['compile'] else ''}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6, len(results) * 1.2), 4))
    ax.bar(labels, [100 * r["mfu"] for r in results], color="tab:blue")
    for i, r in enumerate(results):
        ax.text(i, 100 * r["mfu"], f"{r['tokens_per_s'] / 1e3:.0f}k tok/s", ha="center", va="bottom", fontsize=8)
    ax.axhline(100 * MEASURED_MATMUL[0] / PEAK_BF16, color="gray", ls="--", lw=1, label="measured bf16 matmul (739 TF/s)")
    ax.set_ylabel("MFU vs 989 TFLOP/s (%)")
    ax.set_title(f"familial training step, bf16 autocast ({torch.cuda.get_device_name()})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="directory for train_throughput.json / .png")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--batch-100m", type=int, default=8, help="sequences per step for the 100m preset")
    ap.add_argument("--batch-1b", type=int, default=4, help="sequences per step for the 1b preset")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off", help="torch.compile the loss module")
    ap.add_argument("--time-limit", type=float, default=300, help="skip remaining configurations after this many seconds")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    t_start, results, skipped = time.time(), [], []
    print(f"{'preset':>6} {'G':>2} {'comp':>4} {'B':>3} {'step ms':>9} {'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'vs739':>6} {'mem GB':>7}", flush=True)
    for comp in modes:
        for preset, G, batch, cfg in configs(args):
            if time.time() - t_start > args.time_limit:
                skipped.append({"preset": preset, "G": G, "compile": comp})
                continue
            try:
                r = bench_one(cfg, batch, args.seq_len, args.steps, args.warmup, comp, device)
            except Exception as e:  # OOM or a compile failure: record it, keep the other measurements
                skipped.append({"preset": preset, "G": G, "compile": comp,
                                "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"})
                torch.cuda.empty_cache()
                continue
            r["preset"] = preset
            results.append(r)
            print(f"{preset:>6} {G:>2} {str(comp):>4} {batch:>3} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} "
                  f"{r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {100 * r['frac_of_measured_matmul'][0]:5.1f}% "
                  f"{r['peak_mem_gb']:7.1f}", flush=True)
            write(args, results, skipped, t_start)
    write(args, results, skipped, t_start, final=True)


def write(args, results, skipped, t_start, final=False):
    """Rewritten after every configuration, so a run cut short still leaves its measurements."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "train_throughput", "date": DATE, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": _triton_version(), "dtype": "bfloat16 autocast (fp32 master weights)",
        "peak_flops": PEAK_BF16, "measured_matmul_flops": list(MEASURED_MATMUL),
        "flop_convention": "trunk.flops.flops_per_token 'full' (matmuls + Chinchilla attention + exit heads)",
        "args": vars(args), "results": results, "skipped": skipped, "seconds": round(time.time() - t_start, 1),
    }
    (out / "train_throughput.json").write_text(json.dumps(doc, indent=2) + "\n")
    if results and final:
        plot(results, out / "train_throughput.png")
        print(f"wrote {out / 'train_throughput.json'}")


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
