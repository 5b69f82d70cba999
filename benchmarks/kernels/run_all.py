"""Run the kernel benchmarks on a GPU within one time budget and print the target table.

    python benchmarks/kernels/run_all.py --out $OUT --only prefill,decode --budget prefill=150,decode=90

Each benchmark writes its JSON (kernels_<name>.json) row by row, so a run cut short keeps its data.
The summary (benchmarks/kernels/summary.py) reads those files; plots come from plot.py, on any
machine, from the committed JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode  # noqa: E402
import bench_exit_head  # noqa: E402
import bench_linear_ce  # noqa: E402
import bench_prefill  # noqa: E402
import bench_prefill_cache  # noqa: E402
import summary  # noqa: E402
from common import Budget  # noqa: E402

BENCHES = {"prefill": bench_prefill, "prefill_cache": bench_prefill_cache, "decode": bench_decode, "exit_head": bench_exit_head,
           "linear_ce": bench_linear_ce}
DEFAULT_BUDGET = {"prefill": 150, "prefill_cache": 60, "decode": 100, "exit_head": 150, "linear_ce": 150}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for kernels_*.json")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    ap.add_argument("--budget", default="", help="per-benchmark seconds, e.g. prefill=120,decode=60")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    a = ap.parse_args()
    budgets = dict(DEFAULT_BUDGET)
    for item in filter(None, a.budget.split(",")):
        k, v = item.split("=")
        budgets[k] = float(v)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.only.split(","):
        t0 = time.time()
        print(f"=== {name} (budget {budgets[name]:.0f} s)", flush=True)
        kw = {"with_compile": not a.no_compile} if name in ("exit_head", "linear_ce") else {}
        try:
            BENCHES[name].run(a.out, Budget(budgets[name]), **kw)
        except Exception:
            traceback.print_exc()
        print(f"=== {name} done in {time.time() - t0:.0f} s", flush=True)
    summary.main([str(a.out)])


if __name__ == "__main__":
    main()
