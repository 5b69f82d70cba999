"""`familial-serve`: run one relay tier node, the HTTP router, or a whole local family (demo).

    familial-serve --tier device|edge|cloud --shards DIR [--next HOST:PORT] [--port N]   # one node (relay.cli)
    familial-serve --tier router --family family.yaml [--port 8000]                      # HTTP face over a chain
    familial-serve --tier router --checkpoint DIR                                         # HTTP face, in-process model
    familial-serve --tier router ... --tls-cert C --tls-key K [--tls-ca CA --require-client-cert]   # HTTPS (mTLS)
    familial-serve demo [--host H] [--port P]                                             # built-in family on loopback

The demo splits the built-in family with `deploy`, starts device, edge and cloud nodes as processes
(`serving/local_family.py`; real gRPC over loopback), serves the router in this process and prints a
curl line.
A flag that the chosen role does not use (`--shards` for the router, `--api-key` for a node) is an
error, not silently ignored. Bad input of any kind is one line on stderr and exit status 2
(`trunk/cmdline.py`). This file only parses flags and wires parts together; the parts live in app.py,
engine.py, relay.cli. Tiers made slow on purpose (tests, benchmarks) come from `tests/slow_tiers.py`,
which calls `main(argv, step_delays_ms=...)`; no flag does that.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.settings import ServeSettings
from trunk.cmdline import CLIError, Parser, fail, run

DEFAULT_ROUTER_PORT = 8000
DEFAULT_NODE_PORT = 50051
DEMO_TIERS = "device=0,edge=1,cloud=2.."
PROG = "familial-serve"


# ---- flags ----------------------------------------------------------------------------------------

def _add_router_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("router (--tier router)")
    g.add_argument("--family", metavar="YAML", help="family file listing the tier addresses, head first "
                                                    "(see examples/family.yaml)")
    g.add_argument("--checkpoint", metavar="DIR", help="serve this checkpoint in-process instead of a relay chain")
    _add_http_args(g)


def _add_http_args(g) -> None:
    d = ServeSettings()
    g.add_argument("--api-key", default=os.environ.get("FAMILIAL_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes, /docs and /openapi.json "
                        "(default: $FAMILIAL_API_KEY; unset = open)")
    g.add_argument("--model-name", help="model id to report and accept (default: the family's name)")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt accepted")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens accepted")
    g.add_argument("--max-concurrency", type=int, default=d.max_concurrency, help="requests generating at once")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests waiting for a slot; more get 429 with Retry-After")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help="largest request body in MiB; larger ones get 413 before they are read")
    g.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help="a request body must arrive within this many seconds of its headers, else 408")
    g.add_argument("--calibrate-rounds", type=int, default=3, help="warm-up forwards per exit at start-up")
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn log level")


def build_parser(role: str | None = None) -> Parser:
    """familial-serve's flags: all of them (`role` None, for --help and parsing), or one role's
    (`node` or `router`, to find the flags that role would ignore)."""
    from relay.cli import add_listen_args, add_node_args

    # exact flag names only: an abbreviation could name a flag of one role and a different one of the other
    p = Parser(
        prog=PROG, allow_abbrev=False,
        description="Serve a familial model: one relay tier node (--tier device|edge|cloud|<name>), the HTTP "
                    "router (--tier router), or `familial-serve demo` for a whole local family.",
        epilog="Subcommand: `familial-serve demo [--host H] [--port P] [--checkpoint DIR]` starts device, edge and "
               "cloud nodes and the router on loopback with the built-in family (see `familial-serve demo --help`).")
    p.add_argument("--tier", required=True, metavar="TIER",
                   help="`router` for the HTTP face; otherwise the tier name in the shard manifest to serve "
                        "(device, edge, cloud)")
    port_help = (f"port to listen on, 0 = any free port (default: {DEFAULT_NODE_PORT} for a node, "
                 f"{DEFAULT_ROUTER_PORT} for the router)")
    add_listen_args(p, port_default=None, port_help=port_help)
    if role in (None, "node"):
        add_node_args(p, include_tier=False, listen=False)
    if role in (None, "router"):
        _add_router_args(p)
    return p


def unused_flags(argv: list[str], router: bool) -> list[str]:
    """The flags in `argv` (already parsed by `build_parser()`) that the chosen role does not use."""
    _, rest = build_parser("router" if router else "node").parse_known_args(argv)
    return list(dict.fromkeys(t.split("=", 1)[0] for t in rest if t.startswith("--")))


def build_demo_parser() -> Parser:
    p = Parser(prog=f"{PROG} demo", allow_abbrev=False,
               description="Start device, edge and cloud relay nodes and the HTTP router on loopback with the "
                           "built-in family; Ctrl-C stops everything.")
    p.add_argument("--host", default="127.0.0.1", help="router address (nodes always listen on 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_ROUTER_PORT, help="router port (0 = any free port)")
    p.add_argument("--checkpoint", metavar="DIR", help="family checkpoint to serve (default: the built-in family)")
    p.add_argument("--tiers", default=DEMO_TIERS, help="tier split passed to deploy (familial-deploy --tiers)")
    g = p.add_argument_group("router")
    _add_http_args(g)
    return p


def settings_from_args(args) -> ServeSettings:
    for flag, v in (("--max-body-mb", args.max_body_mb), ("--body-timeout-s", args.body_timeout_s)):
        if not v > 0:
            fail(f"{flag} must be > 0, got {v:g}")
    return ServeSettings(model_name=args.model_name, api_key=args.api_key, max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens_limit=args.max_tokens_limit, max_concurrency=args.max_concurrency,
                         max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 2**20),
                         body_timeout_s=args.body_timeout_s)


# ---- family.yaml ----------------------------------------------------------------------------------

def load_family_yaml(path) -> dict:
    """{"name", "tokenizer" (dir), "tiers": [{"name", "address"}], "tls": TLSConfig | None, "max_seq_len"}."""
    import yaml

    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    tiers = doc.get("tiers") or []
    if not tiers or not all(isinstance(t, dict) and t.get("name") and t.get("address") for t in tiers):
        fail(f"{path}: `tiers` must list {{name, address}} entries, head first")
    tok = doc.get("tokenizer")
    if not tok:
        fail(f"{path}: `tokenizer` must name a directory with the tokenizer files (shards or checkpoint)")
    tok = (path.parent / tok).resolve()
    tls = None
    if doc.get("tls"):
        from relay.types import TLSConfig

        t = {k: (str((path.parent / v).resolve()) if k in ("ca", "cert", "key") and v else v)
             for k, v in doc["tls"].items()}
        tls = TLSConfig(**t)
    return {"name": doc.get("name", "familial"), "tokenizer": tok, "tiers": tiers, "tls": tls,
            "max_seq_len": doc.get("max_seq_len") or _max_seq_len(tok)}


def _max_seq_len(directory: Path) -> int | None:
    for name in ("manifest.json", "family.json"):
        f = directory / name
        if f.is_file():
            return json.loads(f.read_text()).get("architecture", {}).get("max_seq_len")
    return None


def relay_engine_from_family(fam: dict, timeout_s: float = 30.0):
    from serving.engine import RelayEngine
    from trunk.tokenizer import load_tokenizer

    return RelayEngine(fam["tiers"][0]["address"], load_tokenizer(fam["tokenizer"]), name=fam["name"],
                       tier_addresses={t["name"]: t["address"] for t in fam["tiers"]}, tls=fam["tls"],
                       timeout_s=timeout_s, max_seq_len=fam["max_seq_len"])


# ---- running --------------------------------------------------------------------------------------

@dataclass
class HTTPSConfig:
    """The router's own TLS (uvicorn's): certificate and key, and a CA to verify client certificates."""
    cert: str
    key: str
    ca: str | None = None
    require_client_cert: bool = False

    def uvicorn_kwargs(self) -> dict:
        reqs = ssl.CERT_REQUIRED if self.require_client_cert else (ssl.CERT_OPTIONAL if self.ca else ssl.CERT_NONE)
        return {"ssl_certfile": self.cert, "ssl_keyfile": self.key, "ssl_ca_certs": self.ca, "ssl_cert_reqs": reqs}


def https_from_args(args) -> HTTPSConfig | None:
    """HTTPS settings from --tls-*, checked here (files readable, key matches) so that a mistake is one line."""
    if not args.tls_cert:
        if args.tls_key or args.tls_ca or args.require_client_cert:
            fail("--tls-key, --tls-ca and --require-client-cert need --tls-cert (the router's certificate)")
        return None
    if not args.tls_key:
        fail("--tls-cert needs --tls-key")
    if args.require_client_cert and not args.tls_ca:
        fail("--require-client-cert needs --tls-ca to verify client certificates against")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            ctx.load_verify_locations(args.tls_ca)
    except (OSError, ssl.SSLError) as e:
        fail(f"cannot use the TLS files (--tls-cert {args.tls_cert}, --tls-key {args.tls_key}"
             f"{', --tls-ca ' + args.tls_ca if args.tls_ca else ''}): {e}")
    return HTTPSConfig(args.tls_cert, args.tls_key, args.tls_ca, args.require_client_cert)


async def serve_http(app, host: str, port: int, log_level: str = "warning", on_ready=None,
                     https: HTTPSConfig | None = None) -> None:
    """Run uvicorn on the current loop until SIGINT/SIGTERM; `on_ready(port)` once it listens.

    Signals are handled here rather than by uvicorn (which re-raises them once it has stopped), so the
    caller's clean-up (stopping relay nodes) runs to the end; a second Ctrl-C skips waiting on open streams.
    """
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        def capture_signals(self):
            return contextlib.nullcontext()

    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                    **(https.uvicorn_kwargs() if https else {})))

    def on_signal():
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            fail(f"the HTTP server did not start (is {host}:{port} free?)")
        await asyncio.sleep(0.05)
    if on_ready is not None:
        on_ready(server.servers[0].sockets[0].getsockname()[1])
    await task


def run_router(args) -> None:
    from serving.app import build_app
    from serving.engine import LocalEngine

    if bool(args.family) == bool(args.checkpoint):
        fail("--tier router needs exactly one of --family YAML or --checkpoint DIR")
    port = DEFAULT_ROUTER_PORT if args.port is None else args.port
    settings = settings_from_args(args)
    https = https_from_args(args)
    scheme = "https" if https else "http"

    async def main():
        try:
            if args.family:
                engine = relay_engine_from_family(load_family_yaml(args.family))
            else:
                engine = LocalEngine.from_checkpoint(args.checkpoint)
            await engine.start(args.calibrate_rounds)
        except CLIError:
            raise
        except Exception as e:  # noqa: BLE001 - say what is wrong in one line, not a traceback
            fail(f"cannot start the router: {type(e).__name__}: {e}")
        app = build_app(engine, settings)
        await serve_http(app, args.host, port, args.log_level, https=https,
                         on_ready=lambda p: print(f"familial router on {scheme}://{args.host}:{p}/v1", flush=True))

    asyncio.run(main())


def builtin_checkpoint() -> Path:
    from trunk.builtin import builtin_path

    path = Path(builtin_path())
    if not (path / "family.json").is_file():
        fail(f"no built-in family at {path}; pass --checkpoint DIR")
    return path


def curl_line(url: str, model: str, api_key: str | None, chat: bool = False) -> str:
    """A streaming request to paste into a shell (the built-in family was trained on Python source)."""
    body = {"model": model, "max_tokens": 48, "stream": True, "latency_budget_ms": 2000}
    if chat:
        body["messages"] = [{"role": "user", "content": "Write a function that adds two numbers."}]
    else:
        body["prompt"] = "def fibonacci(n):"
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    path = "chat/completions" if chat else "completions"
    return f"curl -N {url}/v1/{path} -H 'Content-Type: application/json'{auth} -d '{json.dumps(body)}'"


def run_demo(argv: list[str], delays: dict[str, float] | None = None) -> None:
    args = build_demo_parser().parse_args(argv)
    from deploy.shards import split_checkpoint

    from serving.app import build_app
    from serving.engine import RelayEngine
    from serving.local_family import LocalFamily
    from trunk.tokenizer import load_tokenizer

    ckpt = Path(args.checkpoint) if args.checkpoint else builtin_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="familial-demo-"))
    settings = settings_from_args(args)
    died: dict[str, int] = {}

    async def watch(family: LocalFamily) -> None:
        """A node that exits on its own stops the demo (SIGTERM to this process: the HTTP server drains)."""
        import signal

        while not family.stopping:
            gone = family.dead()
            if gone:
                died.update(gone)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            await asyncio.sleep(0.5)

    async def main():
        manifest = split_checkpoint(ckpt, work / "shards", args.tiers)
        tiers = [t.name for t in manifest.tiers]
        family = await asyncio.to_thread(LocalFamily(work / "shards", tiers, delays).start)
        watcher = []  # from when the router listens (its SIGTERM handler then drains and stops everything)
        name = args.model_name or f"familial-{ckpt.resolve().name}"
        engine = RelayEngine(family.addresses[tiers[0]], load_tokenizer(work / "shards"), name=name,
                             max_seq_len=manifest.architecture.max_seq_len)
        try:
            try:
                await family.chain_complete()
                await engine.start(args.calibrate_rounds)
            except CLIError:
                raise
            except Exception as e:  # noqa: BLE001 - one line, not a traceback
                fail(f"cannot start the router: {type(e).__name__}: {e}")
            for t in tiers:
                print(f"  {t:>6} node on {family.addresses[t]} (pid {family.procs[t].pid})", flush=True)

            def ready(port):
                watcher.append(asyncio.get_running_loop().create_task(watch(family)))
                url = f"http://{args.host}:{port}"
                print(f"familial demo: router on {url}/v1 (model {name!r}); Ctrl-C stops everything.\n"
                      f"Try:\n  {curl_line(url, name, settings.api_key)}\n"
                      f"or chat:\n  {curl_line(url, name, settings.api_key, chat=True)}\n", flush=True)

            await serve_http(build_app(engine, settings), args.host, args.port, args.log_level, on_ready=ready)
        finally:
            family.stopping = True
            for w in watcher:
                w.cancel()
            await engine.close()
            await asyncio.to_thread(family.stop)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print("familial demo stopped", flush=True)
    if died:
        fail("demo stopped: " + ", ".join(f"the {t} node exited with status {c}" for t, c in died.items()))


def main(argv: list[str] | None = None, *, step_delays_ms: dict[str, float] | None = None) -> int:
    """familial-serve. `step_delays_ms` (tier -> ms slept after every engine step) is for tests and
    benchmarks only (`tests/slow_tiers.py`); it stands in for slower remote tiers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(PROG, lambda: _serve(argv, step_delays_ms or {}))


def _serve(argv: list[str], delays: dict[str, float]) -> None:
    if argv and argv[0] == "demo":
        return run_demo(argv[1:], delays)
    args = build_parser().parse_args(argv)
    router = args.tier == "router"
    unused = unused_flags(argv, router)
    if unused:
        fail(f"{', '.join(unused)}: not used by {'the router' if router else 'a relay node'} (--tier {args.tier})")
    if router:
        if delays:
            fail("step delays slow relay nodes down, not the router")
        return run_router(args)
    run_node_cli(args, delays.get(args.tier, 0.0))


def run_node_cli(args, step_delay_ms: float = 0.0) -> None:
    """A relay node; a shard it refuses (hash, shapes, paths), a TLS file it cannot read or a port it
    cannot bind is one line and exit status 2."""
    from deploy.manifest import ShardError
    from relay.cli import run_node

    if not args.shards:
        fail("--shards DIR is required for a relay node")
    if args.port is None:
        args.port = DEFAULT_NODE_PORT
    try:
        run_node(args, step_delay_ms=step_delay_ms)
    except (ShardError, OSError) as e:
        fail(f"tier {args.tier}: {e}")


if __name__ == "__main__":
    sys.exit(main())
