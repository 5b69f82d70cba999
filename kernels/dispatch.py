"""Per-shape choice between a Triton kernel and PyTorch's own fast path, from committed measurements.

`dispatch_table.json` (next to this file) is written by `benchmarks/kernels/make_dispatch_table.py`
from the committed benchmark results (`benchmarks/results/kernels_prefill.json`); nothing in it is
typed by hand. For prefill it lists, per (head dim, causal, sequence length), which of Triton and
SDPA (its best backend) was faster. A query takes the entry with the same head dim and causality and
the nearest sequence length on a log scale. Shapes the table has no entry for (another head dim, an
empty table) go to SDPA, the established path: the table can only move a shape to Triton by
measurement.

Only the dense case is dispatched (padded batch, no cache, T == S): ragged batches and cached
prefixes have no single-call SDPA equivalent, so they always take the Triton kernel on CUDA.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

TABLE = Path(__file__).with_name("dispatch_table.json")


@functools.lru_cache(maxsize=1)
def load_table() -> dict:
    try:
        return json.loads(TABLE.read_text())
    except FileNotFoundError:
        return {}


def prefill_choice(head_dim: int, causal: bool, seq_len: int, table: dict | None = None) -> str:
    """"triton" or "sdpa" for a dense prefill of this shape."""
    rows = [r for r in (table if table is not None else load_table()).get("prefill", [])
            if r["head_dim"] == head_dim and bool(r["causal"]) == bool(causal)]
    if not rows:
        return "sdpa"
    best = min(rows, key=lambda r: abs(math.log2(max(seq_len, 1)) - math.log2(r["seq_len"])))
    return best["choice"]
