"""Shared benchmark plumbing: environment record, timing (median of triton.testing.do_bench, CUDA
graphs for short kernels), peak-memory measurement, incremental JSON output, a time budget.

Rules kept here so every benchmark obeys them: random inputs (never zeros), warm-up (compilation and
autotuning) before timing, the median, and inputs rotated across copies larger than L2 where a
kernel would otherwise be timed out of the cache.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

L2_BYTES = 50 * 2**20


def env_info() -> dict:
    import triton
    p = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sm_count": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "timing": "median of triton.testing.do_bench (CUDA events); decode: CUDA-graph replays",
    }


def bench_ms(fn, warmup=25, rep=100, grad_to_none=None) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def bench_graph_ms(fns, reps_per_graph=20, rep=200) -> float:
    """Median time of one call, from replays of a CUDA graph holding `reps_per_graph` calls that
    cycle through `fns` (one per input copy, so consecutive calls do not hit L2)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps_per_graph):
            fns[i % len(fns)]()
    torch.cuda.synchronize()
    return bench_ms(g.replay, warmup=25, rep=rep) / reps_per_graph


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated during fn() above what was allocated before it."""
    gc.collect()  # tensors of earlier shapes freed now, not during fn (that made a peak negative once)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def copy_bandwidth_gbs(nbytes=4 * 2**30) -> float:
    """Device-to-device copy, bytes read + bytes written over time."""
    x = torch.randn(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), warmup=50, rep=300)
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6


def n_copies(nbytes: int, cap: int = 8) -> int:
    """Input copies so that one full rotation exceeds ~4x L2."""
    return int(max(1, min(cap, -(-4 * L2_BYTES // max(1, nbytes)))))


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Budget:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()

    def over(self) -> bool:
        return self.left() <= 0


class Results:
    """Rows appended and written after each one, so a run cut short still leaves its data."""

    def __init__(self, path: Path, name: str, meta: dict):
        self.path = Path(path)
        self.doc = {"benchmark": name, "env": env_info(), **meta, "rows": []}

    def add(self, row: dict):
        self.doc["rows"].append(row)
        self.write()
        print(json.dumps(row), flush=True)

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        os.replace(tmp, self.path)


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
