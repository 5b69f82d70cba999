"""The floor of one relay hop: raw gRPC round trips on loopback, no engine, no model.

    python benchmarks/grpc_floor.py --out benchmarks/results        # a few seconds

A relay token at batch 1 crosses two tier pairs and back (device -> edge -> cloud, replies the same
way), so two round trips of this floor sit in every token's latency whatever the engine does. Measured
with an echo server in another process (as the tiers are), for the call styles the relay could use:
a grpc.aio bidirectional stream (what relay/node.py's StepStream uses: one write, one read per step),
a grpc.aio unary call and a synchronous unary call, at the message sizes of a batch-1 hidden state
(d_model 2048 in bf16: 4 KiB) and of a 256-row step (1 MiB). Writes grpc_floor_<host>.json and
prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import grpc

SERVICE = "familial.bench.Echo"
SIZES = (4 << 10, 1 << 20)


def _handlers():
    def unary(req, ctx):
        return req[:16]

    async def stream(req_iter, ctx):
        async for m in req_iter:
            yield m[:16]

    async def aunary(req, ctx):
        return req[:16]

    return unary, stream, aunary


def serve(port_file: str) -> None:
    """Echo server (this process: `--serve FILE`): an aio server for the stream and aio unary, a
    synchronous one for the sync unary; writes both ports to FILE and serves until killed."""
    from concurrent import futures

    unary, stream, aunary = _handlers()
    sync_srv = grpc.server(futures.ThreadPoolExecutor(4))
    sync_srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {"U": grpc.unary_unary_rpc_method_handler(unary)})])
    sync_port = sync_srv.add_insecure_port("127.0.0.1:0")
    sync_srv.start()

    async def main():
        srv = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "S": grpc.stream_stream_rpc_method_handler(stream), "U": grpc.unary_unary_rpc_method_handler(aunary)})])
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        Path(port_file).write_text(json.dumps({"aio": port, "sync": sync_port}))
        await srv.wait_for_termination()

    asyncio.run(main())


async def _aio(port: int, size: int, n: int) -> dict:
    opts = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        msg = b"x" * size
        call = ch.stream_stream(f"/{SERVICE}/S")()
        for _ in range(min(200, n)):
            await call.write(msg)
            await call.read()
        t0 = time.perf_counter()
        for _ in range(n):
            await call.write(msg)
            await call.read()
        stream_us = (time.perf_counter() - t0) / n * 1e6
        await call.done_writing()
        f = ch.unary_unary(f"/{SERVICE}/U")
        for _ in range(min(200, n)):
            await f(msg)
        t0 = time.perf_counter()
        for _ in range(n):
            await f(msg)
        unary_us = (time.perf_counter() - t0) / n * 1e6
    return {"aio_stream_us": round(stream_us, 1), "aio_unary_us": round(unary_us, 1)}


def _sync(port: int, size: int, n: int) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        f = ch.unary_unary(f"/{SERVICE}/U")
        msg = b"x" * size
        for _ in range(min(200, n)):
            f(msg)
        t0 = time.perf_counter()
        for _ in range(n):
            f(msg)
        return round((time.perf_counter() - t0) / n * 1e6, 1)


def measure(n: int) -> list[dict]:
    port_file = Path(f"/tmp/grpc_floor_{os.getpid()}.json")
    port_file.unlink(missing_ok=True)
    srv = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    try:
        t0 = time.time()
        while not port_file.is_file():
            if srv.poll() is not None or time.time() - t0 > 30:
                raise RuntimeError("the echo server did not start")
            time.sleep(0.05)
        time.sleep(0.1)
        ports = json.loads(port_file.read_text())
        rows = []
        for size in SIZES:
            k = n if size < (1 << 20) else max(50, n // 10)
            row = {"bytes": size, "calls": k, **asyncio.run(_aio(ports["aio"], size, k)),
                   "sync_unary_us": _sync(ports["sync"], size, k)}
            rows.append(row)
            print(f"{size:>9,} B: aio stream {row['aio_stream_us']:8.1f} us   aio unary {row['aio_unary_us']:8.1f} us   "
                  f"sync unary {row['sync_unary_us']:8.1f} us   (round trips, {k} calls)", flush=True)
        return rows
    finally:
        srv.kill()
        srv.wait()
        port_file.unlink(missing_ok=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for grpc_floor_<host>.json")
    p.add_argument("--calls", type=int, default=3000, help="round trips per style at the small size")
    p.add_argument("--tag", default="", help="file name tag (default: cpu<cores>)")
    p.add_argument("--serve", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    rows = measure(args.calls)
    tag = args.tag or f"cpu{os.cpu_count()}"
    res = {"what": "gRPC loopback round trips, echo server in another process", "grpc": grpc.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"grpc_floor_{tag}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
