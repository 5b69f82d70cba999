"""Per-hop relay overhead on loopback: wire + codec cost of moving hidden states one tier down.

A pass-through node (relay.stage.IdentityStage: decodes, validates and answers, computes nothing) runs
in its own process; the client here encodes (1, T, D) hidden states in the wire format, sends a
Forward and waits for the reply. One sample = encode + gRPC round trip + server-side decode and
bookkeeping, i.e. what a real hop adds on top of the two tiers' model compute. Hidden sizes
512..4096, positions 1..512, fp16 vs int8 (per-token scales); p50/p99 over many calls.

Also measures memory per session (KV cache + boundary log bytes per tier, from the nodes' Stats) and
the timing split of a decode step to each exit (compute per tier, network per hop, as the router sees
it) for the built-in family (trunk/builtin/ when a checkpoint is there, else the "builtin" preset with
random weights: the bytes depend only on the shape).

    python3 benchmarks/relay_hop.py [--quick] [--out benchmarks/results/relay_hop]

Writes OUT.json and OUT.png. Not measured here: model compute (see serving benchmarks), TLS cost.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from relay import codec  # noqa: E402
from relay.pb import pb, pb_grpc  # noqa: E402

SIZES = (512, 1024, 2048, 4096)
POSITIONS = (1, 8, 64, 512)
WIRES = ("float16", "int8")
MAX_MSG = 64 << 20


def _sink(d_model: int, port_q, offload: bool = False) -> None:
    """Child process: serve an IdentityStage of width d_model until terminated.

    offload=False runs the (empty) compute on the event loop: a worker-thread hand-off is a cost of
    running a model, not of the wire, and it is measured separately (`thread_offload`)."""
    from relay.node import NodeConfig, serve
    from relay.session import Limits
    from relay.stage import IdentityStage

    async def main():
        h = await serve(IdentityStage(d_model), NodeConfig(max_message_bytes=MAX_MSG, offload_compute=offload,
                                                           limits=Limits(max_tokens=1 << 16)))
        port_q.put(h.port)
        await h.wait()
    torch.set_num_threads(1)
    asyncio.run(main())


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _measure(port: int, D: int, n_small: int, n_large: int, positions=POSITIONS, wires=WIRES) -> list[dict]:
    opts = [("grpc.max_send_message_length", MAX_MSG), ("grpc.max_receive_message_length", MAX_MSG)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        stub = pb_grpc.RelayStub(ch)
        sid = (await stub.OpenSession(pb.OpenSessionRequest())).session_id
        rows = []
        for T in positions:
            h = torch.randn(1, T, D, dtype=torch.float16)
            for wire in wires:
                n = n_small if T * D <= 64 * 1024 else n_large
                enc_ms, rpc_ms, tot_ms, srv_ms = [], [], [], []
                for i in range(n + 10):
                    t0 = time.perf_counter()
                    msg = pb.ForwardRequest(session_id=sid, pos=0, hidden=codec.encode(h, wire))
                    t1 = time.perf_counter()
                    rep = await stub.Forward(msg, timeout=30)  # pos 0 every time: the sink replays, no growth
                    t2 = time.perf_counter()
                    if i >= 10:
                        srv_ms.append(rep.total_ms)
                        enc_ms.append((t1 - t0) * 1e3)
                        rpc_ms.append((t2 - t1) * 1e3)
                        tot_ms.append((t2 - t0) * 1e3)
                rows.append({"d_model": D, "positions": T, "wire": wire, "n": n,
                             "message_bytes": msg.ByteSize(),
                             "p50_ms": statistics.median(tot_ms), "p99_ms": _pct(tot_ms, 99),
                             "encode_p50_ms": statistics.median(enc_ms), "rpc_p50_ms": statistics.median(rpc_ms),
                             "rpc_p99_ms": _pct(rpc_ms, 99),
                             "node_p50_ms": statistics.median(srv_ms)})  # decode + bookkeeping in the handler
                print(f"D={D:5d} T={T:4d} {wire:8s} {msg.ByteSize() / 1024:9.1f} KiB  "
                      f"p50 {rows[-1]['p50_ms']:7.3f} ms  p99 {rows[-1]['p99_ms']:7.3f} ms  "
                      f"(encode {rows[-1]['encode_p50_ms']:.3f}, node {rows[-1]['node_p50_ms']:.3f})", flush=True)
        return rows


def hop_overhead(n_small: int, n_large: int, sizes=SIZES, offload: bool = False, **kw) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for D in sizes:
        q = ctx.Queue()
        p = ctx.Process(target=_sink, args=(D, q, offload), daemon=True)
        p.start()
        try:
            port = q.get(timeout=120)
            rows += asyncio.run(_measure(port, D, n_small, n_large, **kw))
        finally:
            p.terminate()
            p.join(10)
    return rows


def session_memory(lengths=(64, 256, 511)) -> dict:
    """KV + boundary-log bytes per session on each tier of the built-in family, from the nodes' Stats."""
    from deploy.shards import split_checkpoint
    from relay.cli import start_node
    from relay.client import RelayClient
    from trunk.checkpoint import save_checkpoint
    from trunk.config import get_preset
    from trunk.model import FamilyModel
    from trunk.tokenizer import ByteTokenizer

    builtin = ROOT / "trunk" / "builtin"
    tmp = Path(tempfile.mkdtemp())
    if (builtin / "family.json").is_file():
        ckpt, source = builtin, "trunk/builtin checkpoint"
    else:
        cfg = get_preset("builtin")
        ckpt, source = save_checkpoint(tmp / "ckpt", FamilyModel(cfg), ByteTokenizer()), \
            "preset 'builtin' with random weights (trunk/builtin has no checkpoint yet)"
    split_checkpoint(ckpt, tmp / "shards", "device=0,edge=1,cloud=2..")

    async def go():
        cloud = await start_node(str(tmp / "shards"), "cloud")
        edge = await start_node(str(tmp / "shards"), "edge", next=f"127.0.0.1:{cloud.port}")
        dev = await start_node(str(tmp / "shards"), "device", next=f"127.0.0.1:{edge.port}")
        cfg = dev.node.cfg
        c = RelayClient(f"127.0.0.1:{dev.port}")
        out = {"source": source, "architecture": cfg.to_dict(), "compute_dtype": str(dev.node.dtype), "by_length": []}
        for n in lengths:
            sid = await c.open_session()
            await c.forward(sid, [1] * n, 0)  # deepest exit: every tier caches all n positions
            row = {"positions": n}
            for h in (dev, edge, cloud):
                st = (await RelayClient(f"127.0.0.1:{h.port}").stats())["sessions"][sid]
                row[h.node.tier] = {"kv_bytes": st["kv_bytes"], "log_bytes": st["log_bytes"]}
            row["total_bytes"] = sum(row[t]["kv_bytes"] + row[t]["log_bytes"] for t in ("device", "edge", "cloud"))
            out["by_length"].append(row)
            await c.close_session(sid)
            print(f"session of {n} positions: {row}", flush=True)
        out["decode_step_ms"] = await _decode_split(c, cfg.G)
        # exact per-position cost (allocations grow by doubling, so the measured bytes include headroom)
        itemsize = torch.finfo(dev.node.dtype).bits // 8
        kv_layer = 2 * cfg.n_kv_heads * cfg.head_dim * itemsize
        out["bytes_per_position"] = {
            t.node.tier: kv_layer * ((t.node.stage.stop_layer - t.node.stage.start_layer)
                                     + cfg.branch_layers * len([g for g in t.node.stage.exits if g < cfg.G - 1]))
            + (0 if t.node.stage.is_last else cfg.d_model * itemsize)
            for t in (dev, edge, cloud)}
        await c.close()
        for h in (dev, edge, cloud):
            await h.stop()
        return out
    return asyncio.run(go())


async def _decode_split(c, G: int, steps: int = 60) -> dict:
    """p50 of the router-visible timing split of one decode step per exit (64-token prompt)."""
    out = {}
    for g in range(G):
        sid = await c.open_session()
        r = await c.forward(sid, list(range(1, 65)), 0, exit=g)
        rows, pos = [], 64
        for _ in range(steps):
            r = await c.forward(sid, [r.token], pos, exit=g)
            pos += 1
            rows.append(r.timings)
        await c.close_session(sid)
        out[f"exit{g}"] = {k: statistics.median(t[k] for t in rows[5:]) for k in rows[-1]}
        print(f"decode step to exit {g}: {out[f'exit{g}']}", flush=True)
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import google.protobuf
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
            "network": "loopback (127.0.0.1), insecure channel"}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, wire in zip(axes, WIRES):
        for D in SIZES:
            rs = [r for r in rows if r["wire"] == wire and r["d_model"] == D]
            xs = [r["positions"] for r in rs]
            ax.plot(xs, [r["p50_ms"] for r in rs], "o-", label=f"D={D} p50")
            ax.plot(xs, [r["p99_ms"] for r in rs], "x:", color=ax.lines[-1].get_color(), alpha=0.6)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="positions per message", title=f"{wire} hidden states")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("per-hop overhead, ms (p50 solid, p99 dotted)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Relay per-hop overhead on loopback (encode + gRPC + decode), CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "relay_hop"), help="output path stem")
    ap.add_argument("--quick", action="store_true", help="few calls per point (smoke run)")
    ap.add_argument("--date", default=dt.date.today().isoformat(), help="date recorded in the results")
    args = ap.parse_args(argv)
    n_small, n_large = (30, 10) if args.quick else (400, 200)
    rows = hop_overhead(n_small, n_large)
    print("thread offload (node compute in a worker thread, as real tiers run it):")
    offload = {"note": "same hop with the node's compute handed to a worker thread (NodeConfig.offload_compute, "
                       "the default for real tiers); the difference is the thread hand-off cost",
               "rows": hop_overhead(n_small, n_large, sizes=(4096,), offload=True, positions=(1, 64), wires=("float16",))}
    mem = session_memory()
    out = Path(args.out)
    result = {"benchmark": "relay_hop", "date": args.date, "machine": machine(),
              "method": "client encode + Forward round trip to a pass-through node in another process; "
                        "fresh message per call; 10 warm-up calls dropped",
              "hop": rows, "thread_offload": offload, "session_memory": mem}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
