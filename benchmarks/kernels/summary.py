"""Print the issue-4 target table (markdown) from kernels_*.json in a folder.

    python benchmarks/kernels/summary.py benchmarks/results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str):
    p = folder / f"kernels_{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _ok(cond) -> str:
    return "met" if cond else "MISSED"


def prefill_rows(doc):
    out = []
    for r in doc["rows"]:
        if r["head_dim"] == 128 and r["seq_len"] >= 2048 and _num(r.get("ratio_vs_sdpa")) and r["kv_heads"] == r["heads"]:
            out.append(f"| prefill D128 {'causal' if r['causal'] else 'full'} S={r['seq_len']} | "
                       f"{r['triton_tflops']:.0f} vs SDPA-{r['sdpa_best']} {r['sdpa_tflops']:.0f} TFLOP/s | "
                       f"{r['ratio_vs_sdpa']:.2f}x (target >= 0.85x) | {_ok(r['ratio_vs_sdpa'] >= 0.85)} |")
    return out


def decode_rows(doc):
    out = []
    for r in doc["rows"]:
        if r.get("skipped") or not _num(r.get("triton_gbs")):
            continue
        if r["cache_len"] >= 16384 and r["batch"] <= 32 and r["n_q"] == 1:
            f = r["triton_frac_of_copy"]
            line = (f"| decode B={r['batch']} Hkv={r['kv_heads']} L={r['cache_len']} | {r['triton_gbs']:.0f} GB/s "
                    f"= {100 * f:.0f}% of copy {doc['copy_gbs']:.0f} | target >= 75% | {_ok(f >= 0.75)} |")
            out.append(line)
            if r["batch"] == 1 and _num(r.get("ratio_vs_sdpa")):
                out.append(f"| decode B=1 Hkv={r['kv_heads']} L={r['cache_len']} vs SDPA best backend | "
                           f"{r['triton_gbs']:.0f} vs {r['sdpa_gbs']:.0f} GB/s ({r['sdpa_best']}) | "
                           f"{r['ratio_vs_sdpa']:.2f}x (target >= 1.4x) | {_ok(r['ratio_vs_sdpa'] >= 1.4)} |")
                if _num(r.get("sdpa_default_gbs")):
                    x = r["triton_gbs"] / r["sdpa_default_gbs"]
                    out.append(f"| decode B=1 Hkv={r['kv_heads']} L={r['cache_len']} vs SDPA default dispatch | "
                               f"{r['triton_gbs']:.0f} vs {r['sdpa_default_gbs']:.0f} GB/s | "
                               f"{x:.2f}x (target >= 1.4x) | {_ok(x >= 1.4)} |")
    return out


def exit_rows(doc):
    out = []
    for r in doc["rows"]:
        tag = f"exit head rows={r['rows']} H={r['hidden']} V={r['vocab']}"
        if r["rows"] <= 64 and _num(r.get("triton_frac_of_copy")):
            f = r["triton_frac_of_copy"]
            out.append(f"| {tag} | {r['triton_gbs']:.0f} GB/s = {100 * f:.0f}% of copy | target >= 85% | {_ok(f >= 0.85)} |")
        if r["rows"] >= 4096:
            if _num(r.get("speedup_vs_eager")):
                s = r["speedup_vs_eager"]
                out.append(f"| {tag} vs eager | {r['triton_ms']:.2f} vs {r['eager_ms']:.2f} ms | "
                           f"{s:.2f}x (target >= 2x) | {_ok(s >= 2)} |")
                t = r["temp_frac_of_eager"]
                out.append(f"| {tag} temporaries | {r['triton_peak_bytes'] / 2**20:.0f} MiB vs "
                           f"{r['eager_peak_bytes'] / 2**30:.2f} GiB | {100 * t:.1f}% (target <= 5%) | {_ok(t <= 0.05)} |")
            if _num(r.get("speedup_vs_compile")):
                s = r["speedup_vs_compile"]
                out.append(f"| {tag} vs compile | {r['triton_ms']:.2f} vs {r['compile_ms']:.2f} ms | "
                           f"{s:.2f}x (target >= 1.2x) | {_ok(s >= 1.2)} |")
    return out


def cache_rows(doc):
    out = []
    for r in doc["rows"]:
        if _num(r.get("speedup_vs_sdpa_mask")):
            out.append(f"| prefill over cache B={r['batch']} T={r['new_tokens']} cached={r['cached']} | "
                       f"{r['triton_tflops']:.0f} vs SDPA+mask {r['sdpa_mask_tflops']:.0f} TFLOP/s | "
                       f"{r['speedup_vs_sdpa_mask']:.2f}x | (no target) |")
    return out


def ce_rows(doc):
    out = []
    for r in doc["rows"]:
        tag = f"linear-CE BT={r['rows']} G={r['exits']}"
        if _num(r.get("time_ratio_vs_eager")):
            t, m = r["time_ratio_vs_eager"], r["mem_frac_of_eager"]
            out.append(f"| {tag} vs eager | {r['triton_ms']:.1f} vs {r['eager_ms']:.1f} ms, "
                       f"{r['triton_peak_bytes'] / 2**30:.2f} vs {r['eager_peak_bytes'] / 2**30:.2f} GiB | "
                       f"time {t:.2f}x (<= 1.0), memory {100 * m:.1f}% (<= 10%) | {_ok(t <= 1.0 and m <= 0.10)} |")
        elif _num(r.get("triton_ms")):
            out.append(f"| {tag} | {r['triton_ms']:.1f} ms, {r['triton_peak_bytes'] / 2**30:.2f} GiB; "
                       f"eager {r.get('eager_ms', 'not run')} | no eager ratio | - |")
        if _num(r.get("time_ratio_vs_compile")):
            t = r["time_ratio_vs_compile"]
            out.append(f"| {tag} vs compile | {r['triton_ms']:.1f} vs {r['compile_ms']:.1f} ms | "
                       f"{t:.2f}x (target <= 1.2x) | {_ok(t <= 1.2)} |")
    return out


def table(folder: Path) -> str:
    lines = ["| point | measured | ratio | target |", "| --- | --- | --- | --- |"]
    env = None
    for name, fn in (("prefill", prefill_rows), ("prefill_cache", cache_rows), ("decode", decode_rows),
                     ("exit_head", exit_rows), ("linear_ce", ce_rows)):
        doc = _load(folder, name)
        if doc is None:
            lines.append(f"| {name} | not run | | |")
            continue
        env = env or doc["env"]
        lines += fn(doc)
    head = ""
    if env:
        head = (f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
                f"{env['date']}\n\n")
    return head + "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    print(table(Path(argv[0] if argv else "benchmarks/results")), flush=True)


if __name__ == "__main__":
    main()
