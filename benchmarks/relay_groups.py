"""Relay throughput against the head's micro-batches: device, edge and cloud `relay.cli` processes.

    python benchmarks/relay_groups.py --out benchmarks/results                   # CPU, `tiny` preset
    python benchmarks/relay_groups.py --delay-ms 0 20 --micro-batches 1 3 --repeats 2

K concurrent greedy requests of T tokens go through the chain; each (micro-batches, delay) setting runs
`--repeats` times, the settings alternated so that a slower minute of a shared machine hits all of them.
`--delay-ms` makes every tier's engine step cost that much more (tests/slow_tiers.py), standing in for a
step whose cost does not grow with its rows (a decode step bound by reading the weights). Per setting:
tokens/s, and per tier the steps, rows per step and CPU time per row (from each node's Stats).
Writes relay_groups.json and relay_groups.png to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.engine_throughput import tier_load  # noqa: E402

TIERS = ("device", "edge", "cloud")


def make_shards(tmp: Path, preset: str) -> Path:
    from deploy.shards import split_checkpoint
    from trunk.checkpoint import save_checkpoint
    from trunk.config import get_preset
    from trunk.model import FamilyModel
    from trunk.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = FamilyModel(get_preset(preset).replace(vocab_size=256))
    save_checkpoint(tmp / "ckpt", model, ByteTokenizer(), exit_val_loss=None, dtype="float32")
    split_checkpoint(tmp / "ckpt", tmp / "shards", "device=0,edge=1,cloud=2..")
    return tmp / "shards"


async def _load(fam, k: int, tokens: int) -> dict:
    from relay.client import RelayClient
    from relay.work import GenRequest

    await fam.chain_complete(timeout_s=120)
    client = RelayClient(fam.addresses["device"], timeout_s=600)
    stream = client.generate_stream()

    async def one(i: int, n: int) -> int:
        got = 0
        async for ev in stream.submit(GenRequest(f"r{i}-{n}", list(range(8 + i % 8)), n, ignore_eos=True)):
            if ev.error:
                raise RuntimeError(ev.error)
            got += ev.token >= 0
        return got

    try:
        await asyncio.gather(*(one(i, 8) for i in range(k)))  # warm-up
        s0 = await tier_load(fam.addresses)
        t0 = time.perf_counter()
        toks = sum(await asyncio.gather(*(one(i, tokens) for i in range(k))))
        wall = time.perf_counter() - t0
        s1 = await tier_load(fam.addresses)
    finally:
        await stream.close()
        await client.close()
    tiers = {}
    for t in s0:
        steps, rows, cpu = (s1[t][k] - s0[t][k] for k in ("steps", "rows", "cpu_s"))
        tiers[t] = {"steps": steps, "rows_per_step": round(rows / max(steps, 1), 1),
                    "cpu_us_per_row": round(cpu / max(rows, 1) * 1e6, 1)}
    return {"tokens": toks, "wall_s": round(wall, 3), "tok_s": round(toks / wall, 1), "tiers": tiers}


def run_setting(shards: Path, tmp: Path, mb: int, delay_ms: float, k: int, tokens: int) -> dict:
    from serving.local_family import LocalFamily

    delays = {t: delay_ms for t in TIERS} if delay_ms > 0 else None
    fam = LocalFamily(shards, list(TIERS), delays=delays, args=["--device", "cpu", "--max-slots", str(k),
                                                                "--no-verify"],
                      log_dir=tmp, echo=False, micro_batches=mb)
    fam.start()
    try:
        return asyncio.run(_load(fam, k, tokens))
    finally:
        fam.stop()


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = sorted({r["delay_ms"] for r in res["runs"]})
    mbs = sorted({r["micro_batches"] for r in res["runs"]})
    fig, axes = plt.subplots(1, len(delays), figsize=(4.5 * len(delays), 3.6), squeeze=False)
    for ax, d in zip(axes[0], delays):
        for i, mb in enumerate(mbs):
            vals = [r["tok_s"] for r in res["runs"] if r["delay_ms"] == d and r["micro_batches"] == mb]
            ax.bar(i, sum(vals) / len(vals), color="C%d" % i)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(mbs)), [f"{mb} group(s)" for mb in mbs])
        ax.set_title(f"tier steps + {d:g} ms" if d else "tier steps as computed")
        ax.set_ylabel("tokens / s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"relay, 3 processes, {res['preset']}, {res['requests']} x {res['tokens']} tokens "
                 f"({res['device']}, {res['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for JSON + PNG")
    p.add_argument("--preset", default="tiny", help="model shape (random weights)")
    p.add_argument("--requests", type=int, default=63, help="concurrent requests")
    p.add_argument("--tokens", type=int, default=48, help="tokens per request")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 3], help="head micro-batch settings")
    p.add_argument("--delay-ms", type=float, nargs="+", default=[0.0, 20.0], help="added cost of every tier step")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, alternated")
    args = p.parse_args(argv)
    if min(args.micro_batches) < 1 or args.requests < 1 or args.tokens < 1 or min(args.delay_ms) < 0:
        p.error("--micro-batches, --requests and --tokens must be >= 1, --delay-ms >= 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"what": "relay throughput against the head's micro-batches", "device": platform.processor() or "cpu",
           "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "requests": args.requests,
           "tokens": args.tokens, "runs": []}
    with tempfile.TemporaryDirectory(prefix="relay-groups-") as d:
        tmp = Path(d)
        shards = make_shards(tmp, args.preset)
        for rep in range(args.repeats):
            for delay in args.delay_ms:
                for mb in args.micro_batches:
                    r = run_setting(shards, tmp, mb, delay, args.requests, args.tokens)
                    res["runs"].append({"repeat": rep, "micro_batches": mb, "delay_ms": delay, **r})
                    print(f"delay {delay:g} ms, {mb} group(s): {r['tok_s']:.0f} tok/s  " + "  ".join(
                        f"{t} {v['steps']} steps x {v['rows_per_step']} rows" for t, v in r["tiers"].items()),
                        flush=True)
    (out / "relay_groups.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "relay_groups.png")
    print(f"wrote {out / 'relay_groups.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
