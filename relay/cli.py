"""Launching a relay node: argparse flags, a blocking `run_node(args)` and an in-process `start_node`.

`familial-serve --tier device|edge|cloud --shards DIR [--next HOST:PORT] [--port N] [--tls-...]`
(serving/) calls `add_node_args` and `run_node`; tests call `start_node`, which returns a handle with
`.port` and `async .stop()`. `python3 -m relay.cli ...` runs a node without the serving package.
This file only turns flags into a stage, a NodeConfig and TLS settings; the node is `relay/node.py`.
No flag slows a node down for tests: `tests/slow_tiers.py` passes `run_node(..., step_delay_ms=)`.
"""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys

from relay.codec import WIRE_DTYPES
from relay.node import NodeConfig, NodeHandle, serve
from relay.tier import TierConfig
from relay.types import TLSConfig
from trunk.checkpoint import DTYPES
from trunk.cmdline import CLIError, Parser, log_to_stderr, run

PROG = "python3 -m relay.cli"


DEFAULT_PORT = 50051
STOP_TIMEOUT_S = 10.0  # from SIGINT/SIGTERM to the process gone, at most (the server drains for 1 s of it)


def add_listen_args(parser: argparse.ArgumentParser, *, port_default: int | None = DEFAULT_PORT,
                    port_help: str = "port to listen on (0 = any free port)") -> None:
    """Where a server listens and its own TLS: the flags a relay node and the HTTP router share."""
    g = parser.add_argument_group("listen")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=port_default, help=port_help)
    g.add_argument("--tls-cert", help="PEM certificate to serve with (enables TLS)")
    g.add_argument("--tls-key", help="PEM private key for --tls-cert")
    g.add_argument("--tls-ca", help="PEM CA bundle that client certificates are checked against (a node also "
                                    "checks --next's certificate against it)")
    g.add_argument("--require-client-cert", action="store_true",
                   help="mutual TLS: refuse clients without a certificate from --tls-ca")


def add_node_args(parser: argparse.ArgumentParser, include_tier: bool = True,
                  listen: bool = True) -> argparse.ArgumentParser:
    """Node flags. Pass include_tier=False when the caller defines --tier itself, listen=False when it
    adds the `add_listen_args` group itself (familial-serve shares it with the router)."""
    if include_tier:
        parser.add_argument("--tier", required=True, help="tier name in the shard manifest (device, edge, cloud)")
    if listen:
        add_listen_args(parser)
    g = parser.add_argument_group("relay node")
    g.add_argument("--shards", help="stage-shard directory written by `familial-deploy split`")
    g.add_argument("--next", default=None, metavar="HOST:PORT", help="next (deeper) tier to relay to")
    g.add_argument("--device", default="cpu", help="torch device for the stage")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default: float32 on CPU, where half-precision matmuls are slow; else the shards')")
    g.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the shards (shapes are still checked)")
    g.add_argument("--onnx", action="store_true", help="run this tier on ONNX Runtime (device tier, after `familial-deploy export-onnx`)")
    g.add_argument("--wire-dtype", default="auto", choices=["auto", *WIRE_DTYPES],
                   help="hidden states sent to --next; auto = compute dtype (lossless, exact)")
    g.add_argument("--max-message-mb", type=float, default=64, help="largest gRPC message either way, MiB")
    g.add_argument("--node-token", default=os.environ.get("FAMILIAL_NODE_TOKEN"),
                   help="shared secret tiers present to each other (required from upstream, sent to --next) "
                        "(default: $FAMILIAL_NODE_TOKEN)")
    g.add_argument("--admin-token", default=os.environ.get("FAMILIAL_ADMIN_TOKEN"),
                   help="Stats lists session ids only to callers presenting this (or the node token) "
                        "(default: $FAMILIAL_ADMIN_TOKEN)")
    e = parser.add_argument_group("tier engine")
    e.add_argument("--kv-memory-mb", type=float, default=None,
                   help="KV pool budget in MiB (default: --kv-memory-fraction of free memory)")
    e.add_argument("--kv-memory-fraction", type=float, default=0.5,
                   help="fraction of free device memory for the KV pool when --kv-memory-mb is not given")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="positions per sequence (default: the model's max_seq_len); a pool slot holds this many")
    e.add_argument("--max-slots", type=int, default=None,
                   help="sequences resident in the pool at once, at most (default: 256 on CUDA, 64 on CPU)")
    e.add_argument("--max-batch-tokens", type=int, default=None,
                   help="rows per engine step: decode tokens plus prefill chunks (default: 8192 on CUDA, 2048 on CPU)")
    e.add_argument("--max-batch-seqs", type=int, default=256, help="sequences per engine step")
    e.add_argument("--micro-batches", type=int, default=TierConfig.micro_batches,
                   help="at the head tier, with --next: run at most 1/N of the runnable sequences per step so "
                        "tiers overlap (1: no split; deeper tiers take each group whole)")
    e.add_argument("--max-sessions", type=int, default=4096, help="sequences tracked (resident or not)")
    e.add_argument("--idle-timeout-s", type=float, default=600, help="release sequences with no work this long")
    e.add_argument("--step-timeout-s", type=float, default=30,
                   help="deadline of a step whose request set none; then answer from the deepest tier that did")
    e.add_argument("--deadline-margin-ms", type=float, default=25,
                   help="time kept back from a deadline to answer degraded if --next is late")
    t = parser.add_argument_group("TLS to --next")
    t.add_argument("--next-tls-ca", help="CA for --next (default: --tls-ca)")
    t.add_argument("--next-tls-cert", help="client certificate for --next (default: --tls-cert)")
    t.add_argument("--next-tls-key", help="client key for --next (default: --tls-key)")
    t.add_argument("--next-server-name", help="name to check in --next's certificate (default: its host)")
    t.add_argument("--next-plaintext", action="store_true", help="dial --next without TLS even if this node serves TLS")
    return parser


def tls_from_args(args) -> tuple[TLSConfig | None, TLSConfig | None]:
    server = TLSConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if args.tls_cert else None
    ca = args.next_tls_ca or args.tls_ca
    nxt = None
    if args.next and ca and not args.next_plaintext:
        nxt = TLSConfig(ca=ca, cert=args.next_tls_cert or args.tls_cert, key=args.next_tls_key or args.tls_key,
                        server_name=args.next_server_name)
    if server and args.next and nxt is None:
        why = "--next-plaintext" if args.next_plaintext else "no CA for it (--next-tls-ca or --tls-ca)"
        logging.getLogger("familial.relay").warning(
            "this node serves TLS but dials --next %s in PLAINTEXT (%s): hidden states leave unencrypted",
            args.next, why)
    return server, nxt


def load_stage(shards: str, tier: str, *, onnx: bool = False, device: str = "cpu", dtype: str | None = None,
               verify: bool = True):
    if not shards:
        raise CLIError("--shards DIR is required")
    if onnx:
        from deploy.onnx_export import OnnxTierStage
        return OnnxTierStage(shards, tier, verify=verify)
    from deploy.shards import load_tier
    if dtype is None and str(device) == "cpu":
        dtype = "float32"
    return load_tier(shards, tier, device=device, dtype=DTYPES[dtype] if dtype else None, verify=verify)


def config_from_args(args, next_tls: TLSConfig | None, device: str = "cpu", step_delay_ms: float = 0.0) -> NodeConfig:
    """`step_delay_ms`: test and benchmark launchers only (tests/slow_tiers.py); no flag sets it."""
    cuda = str(device).startswith("cuda")
    engine = TierConfig(max_batch_tokens=args.max_batch_tokens or (8192 if cuda else 2048),
                        max_batch_seqs=args.max_batch_seqs, micro_batches=args.micro_batches,
                        deadline_margin_ms=args.deadline_margin_ms, step_timeout_s=args.step_timeout_s,
                        max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout_s)
    return NodeConfig(next=args.next, next_tls=next_tls, engine=engine, kv_memory_mb=args.kv_memory_mb,
                      kv_memory_fraction=args.kv_memory_fraction, max_model_len=args.max_model_len,
                      max_slots=args.max_slots, wire_dtype=args.wire_dtype,
                      max_message_bytes=int(args.max_message_mb * 2**20), node_token=args.node_token,
                      admin_token=args.admin_token, onnx=args.onnx, inject_delay_ms=step_delay_ms)


async def start_node(shards: str | None = None, tier: str | None = None, *, stage=None, host: str = "127.0.0.1",
                     port: int = 0, tls: TLSConfig | None = None, require_client_cert: bool = False,
                     onnx: bool = False, verify: bool = True, **config) -> NodeHandle:
    """In-process node (tests). `stage` overrides loading from `shards`; `config` are NodeConfig fields
    (next=, next_tls=, engine=TierConfig(...), kv_memory_mb=, wire_dtype=, inject_delay_ms= for a slow tier, ...)."""
    if stage is None:
        stage = load_stage(shards, tier, onnx=onnx, verify=verify)
    return await serve(stage, NodeConfig(onnx=onnx, **config), host=host, port=port, tls=tls,
                       require_client_cert=require_client_cert)


async def _serve_until_signal(args, step_delay_ms: float) -> None:
    # Handlers first: a signal sent as soon as "serving on" is logged must stop the node, not interrupt it
    # (a KeyboardInterrupt inside the loop can leave grpc hanging on the way out).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tls, next_tls = tls_from_args(args)
    stage = load_stage(args.shards, args.tier, onnx=args.onnx, device=args.device, dtype=args.dtype,
                       verify=not args.no_verify)
    handle = await serve(stage, config_from_args(args, next_tls, args.device, step_delay_ms), host=args.host,
                         port=args.port, tls=tls, require_client_cert=args.require_client_cert)
    logging.getLogger("familial.relay").info(
        "tier %s (layers %d..%d, exits %s) serving on %s:%d%s%s", stage.tier, stage.start_layer, stage.stop_layer,
        stage.exits, args.host, handle.port, " with TLS" if tls else "", f", next {args.next}" if args.next else "")
    await stop.wait()
    # grpc's aio channels can hang the shutdown after failed connects (grpc/grpc#29560): past this, the
    # C watchdog prints every thread's stack and exits with status 1 instead of hanging.
    faulthandler.dump_traceback_later(STOP_TIMEOUT_S, exit=True)
    await handle.stop(grace=1.0)


def run_node(args, *, step_delay_ms: float = 0.0) -> None:
    """Blocking: serve until SIGINT/SIGTERM. SIGUSR1 prints every thread's Python stack to stderr (a
    stalled node says where it is without being stopped). `step_delay_ms` (tests only): sleep this long
    after every engine step, standing in for a slow tier."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log_to_stderr()
    asyncio.run(_serve_until_signal(args, step_delay_ms))


def main(argv=None) -> int:
    parser = add_node_args(Parser(prog=PROG, description="Run one relay tier node (what `familial-serve --tier "
                                                         "device|edge|cloud` runs), without the serving package."))
    from deploy.manifest import ShardError

    return run(PROG, lambda: run_node(parser.parse_args(argv)), (ShardError, OSError))


if __name__ == "__main__":
    sys.exit(main())
