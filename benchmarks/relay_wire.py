"""What one relay hop's messages cost the host: a step message and its reply, encoded and decoded.

    python benchmarks/relay_wire.py --out benchmarks/results            # a few seconds

relay/wire.py turns a tier's StepMessage (every sequence's rows of boundary states) into protobuf and
back, and the reply's per-sequence Results the same way; on a step of many rows this host work sits on
every hop of every round (docs/serving.md, "What bounds the relay's throughput"). Measured for
`--rows` sequences of one row each at `--d-model` in bf16 (a decode step), answers with two confidence
entries and three timings each, through SerializeToString / FromString as on the wire. Writes
relay_wire_<tag>.json and prints microseconds per step and per row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay import wire  # noqa: E402
from relay.pb import pb  # noqa: E402
from relay.work import Result, SeqStep, StepMessage, StepReply  # noqa: E402


def _us(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def measure(rows: int, d_model: int, n: int) -> dict:
    seqs = [SeqStep(f"req-{i:06d}", 100 + i, 1, 3, deadline_ms=5000.0) for i in range(rows)]
    msg = StepMessage(seqs, torch.randn(rows, d_model, dtype=torch.bfloat16), "node-1")
    res = [Result(token=i, exit=3, tier="cloud", confidence=[(0, 0.4, 1.1, 0.2), (3, 0.9, 0.1, 0.5)],
                  timings={"cloud": 1.0, "edge": 0.8, "net:edge->cloud": 0.3}, length=100 + i, total_ms=2.0)
           for i in range(rows)]
    step_bytes = wire.step_to_pb(msg, "bfloat16").SerializeToString()
    reply_bytes = wire.reply_to_pb(StepReply(res, "cloud")).SerializeToString()
    out = {
        "step_encode_us": _us(lambda: wire.step_to_pb(msg, "bfloat16").SerializeToString(), n),
        "step_decode_us": _us(lambda: wire.step_from_pb(pb.StepRequest.FromString(step_bytes), d_model,
                                                        torch.bfloat16, 1 << 16, 4), n),
        "reply_encode_us": _us(lambda: wire.reply_to_pb(StepReply(res, "cloud")).SerializeToString(), n),
        "reply_decode_us": _us(lambda: wire.reply_from_pb(pb.StepReply.FromString(reply_bytes), rows), n),
    }
    out = {k: round(v, 1) for k, v in out.items()}
    out["hop_us"] = round(sum(out.values()), 1)
    out["hop_us_per_row"] = round(out["hop_us"] / rows, 2)
    out.update(rows=rows, d_model=d_model, step_bytes=len(step_bytes), reply_bytes=len(reply_bytes))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for relay_wire_<tag>.json")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256], help="sequences (one row each) per step")
    p.add_argument("--d-model", type=int, default=2048, help="hidden size (the 1b preset: 2048)")
    p.add_argument("--repeats", type=int, default=50, help="timed repetitions per figure")
    p.add_argument("--tag", default="", help="file name tag (default: cpu<cores>)")
    args = p.parse_args(argv)
    rows = []
    for r in args.rows:
        rows.append(measure(r, args.d_model, args.repeats))
        x = rows[-1]
        print(f"{r:>5} rows: step {x['step_encode_us']:8.1f} + {x['step_decode_us']:8.1f} us, reply "
              f"{x['reply_encode_us']:8.1f} + {x['reply_decode_us']:8.1f} us = {x['hop_us']:9.1f} us a hop "
              f"({x['hop_us_per_row']:.2f} per row; {x['step_bytes']:,} + {x['reply_bytes']:,} B)", flush=True)
    res = {"what": "relay step message + reply, encode and decode (relay/wire.py)", "torch": torch.__version__,
           "python": platform.python_version(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"relay_wire_{args.tag or f'cpu{os.cpu_count()}'}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
