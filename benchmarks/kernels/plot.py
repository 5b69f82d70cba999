"""PNG plots of the committed kernel benchmarks (runs anywhere: reads benchmarks/results/*.json).

    python benchmarks/kernels/plot.py [benchmarks/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(folder, name):
    p = folder / f"kernels_{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _title(doc, what):
    e = doc["env"]
    return f"{what}\n{e['device']}, torch {e['torch']}, triton {e['triton']}, {e['date']}"


def plot_prefill(doc, out):
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
    for ax, (D, causal) in zip(axes, [(128, True), (128, False), (64, True), (64, False)]):
        rows = [r for r in doc["rows"] if r["head_dim"] == D and r["causal"] == causal and r["kv_heads"] == r["heads"]]
        S = [r["seq_len"] for r in rows]
        for key, label in (("triton_tma_tflops", "Triton (TMA)"), ("triton_pointers_tflops", "Triton (pointers)"),
                           ("sdpa_cudnn_tflops", "SDPA cuDNN"), ("sdpa_flash_tflops", "SDPA flash")):
            ax.plot(S, [r.get(key) or float("nan") for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={D}, {'causal' if causal else 'full'}")
        ax.set_xlabel("sequence length (B*S = 16k)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[0].legend()
    fig.suptitle(_title(doc, "prefill attention, bf16, H*D = 2048"))
    fig.tight_layout()
    fig.savefig(out / "kernels_prefill.png", dpi=110)


def plot_decode(doc, out):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    for ax, hkv in zip(axes, (8, 32)):
        for B in (1, 8, 32, 128):
            rows = sorted([r for r in doc["rows"] if r["kv_heads"] == hkv and r["batch"] == B and r["n_q"] == 1
                           and r.get("triton_gbs")], key=lambda r: r["cache_len"])
            if not rows:
                continue
            L = [r["cache_len"] for r in rows]
            line, = ax.plot(L, [r["triton_gbs"] for r in rows], marker="o", label=f"Triton B={B}")
            ax.plot(L, [r.get("sdpa_gbs") or float("nan") for r in rows], marker="x", ls="--",
                    color=line.get_color(), label=f"SDPA best B={B}")
        ax.axhline(doc["copy_gbs"], color="k", lw=1, label="device copy")
        ax.axhline(0.75 * doc["copy_gbs"], color="k", lw=1, ls=":", label="75% of copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length")
        ax.set_title(f"Hq 32, Hkv {hkv}, D 128")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("K/V read GB/s (CUDA graphs)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(_title(doc, "decode attention, bf16, one query token"))
    fig.tight_layout()
    fig.savefig(out / "kernels_decode.png", dpi=110)


def plot_exit_head(doc, out):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    rows = [r for r in doc["rows"] if r["hidden"] == 4096 and r["vocab"] == 128256]
    N = [r["rows"] for r in rows]
    for key, label in (("triton_ms", "Triton"), ("eager_ms", "eager"), ("compile_ms", "torch.compile")):
        axes[0].plot(N, [r.get(key) if isinstance(r.get(key), float) else float("nan") for r in rows],
                     marker="o", label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("rows")
    axes[0].set_ylabel("ms (Python-launched)")
    axes[0].set_title("H 4096, V 128256: time")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    small = [r for r in doc["rows"] if r["rows"] <= 64 and r.get("triton_gbs")]
    labels = [f"{r['rows']}/{r['hidden']}/{r['vocab'] // 1000}k" for r in small]
    x = range(len(small))
    axes[1].bar([i - 0.2 for i in x], [r["triton_gbs"] for r in small], width=0.4, label="Triton (graph)")
    axes[1].bar([i + 0.2 for i in x], [r.get("eager_graph_gbs") or 0 for r in small], width=0.4, label="eager (graph)")
    axes[1].axhline(0.85 * doc["copy_gbs"], color="k", ls=":", label="85% of copy")
    axes[1].set_xticks(list(x), labels, rotation=60, fontsize=7)
    axes[1].set_ylabel("weight read GB/s")
    axes[1].set_title("decode rows: rows/H/V")
    axes[1].legend(fontsize=8)
    fig.suptitle(_title(doc, "fused exit head, bf16"))
    fig.tight_layout()
    fig.savefig(out / "kernels_exit_head.png", dpi=110)


def plot_linear_ce(doc, out):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for G, m in ((1, "o"), (2, "s"), (4, "^")):
        rows = sorted([r for r in doc["rows"] if r["exits"] == G], key=lambda r: r["rows"])
        BT = [r["rows"] for r in rows]
        for key, ls in (("triton", "-"), ("eager", "--"), ("compile", ":")):
            vals = [r.get(f"{key}_ms") if isinstance(r.get(f"{key}_ms"), float) else float("nan") for r in rows]
            axes[0].plot(BT, vals, marker=m, ls=ls, label=f"{key} G={G}")
            mem = [r.get(f"{key}_peak_bytes", float("nan")) / 2**30 for r in rows]
            axes[1].plot(BT, mem, marker=m, ls=ls, label=f"{key} G={G}")
    for ax, yl in zip(axes, ("fwd+bwd ms", "peak extra GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows (B*T)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3)
    fig.suptitle(_title(doc, "multi-exit linear + cross-entropy, H 4096, V 128256, bf16"))
    fig.tight_layout()
    fig.savefig(out / "kernels_linear_ce.png", dpi=110)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0] if argv else "benchmarks/results")
    for name, fn in (("prefill", plot_prefill), ("decode", plot_decode), ("exit_head", plot_exit_head),
                     ("linear_ce", plot_linear_ce)):
        doc = _load(folder, name)
        if doc:
            fn(doc, folder)
            print(f"wrote {folder}/kernels_{name}.png")


if __name__ == "__main__":
    main()
