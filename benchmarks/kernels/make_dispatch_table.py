"""Write kernels/dispatch_table.json from the committed prefill benchmark (no hand-typed entries).

    python benchmarks/kernels/make_dispatch_table.py [benchmarks/results/kernels_prefill.json]

For each measured (head dim, causal, sequence length) of the MHA sweep the faster of Triton (the
dense path that kernels.prefill_attention would run) and SDPA's best backend is recorded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) if argv else ROOT / "benchmarks/results/kernels_prefill.json"
    doc = json.loads(src.read_text())
    rows = []
    for r in doc["rows"]:
        if r["kv_heads"] != r["heads"] or not r.get("triton_tflops") or not r.get("sdpa_tflops"):
            continue
        rows.append({
            "head_dim": r["head_dim"], "causal": r["causal"], "seq_len": r["seq_len"],
            "triton_tflops": round(r["triton_tflops"], 1), "sdpa_tflops": round(r["sdpa_tflops"], 1),
            "sdpa_backend": r["sdpa_best"],
            "choice": "triton" if r["triton_tflops"] > r["sdpa_tflops"] else "sdpa",
        })
    table = {
        "source": str(src.resolve().relative_to(ROOT)),
        "device": doc["env"]["device"], "torch": doc["env"]["torch"], "triton": doc["env"]["triton"],
        "date": doc["env"]["date"], "dtype": doc.get("dtype"),
        "prefill": rows,
    }
    out = ROOT / "kernels/dispatch_table.json"
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: {sum(r['choice'] == 'triton' for r in rows)} of {len(rows)} shapes to Triton")


if __name__ == "__main__":
    main()
