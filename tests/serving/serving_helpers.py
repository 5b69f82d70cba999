"""Real HTTP servers on loopback for the serving tests (uvicorn in a daemon thread)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


async def start_family(shards, tiers: list[str], delays: dict[str, float] | None = None) -> list:
    """One in-process relay node per tier, deepest first so each knows its next; head first in the result.
    `delays` (tier -> ms after every engine step) makes tiers slow on purpose. No micro-batches: tiers
    sharing one process and its interpreter lock cannot overlap."""
    from relay.cli import start_node
    from relay.tier import TierConfig

    handles, nxt = [], None
    for tier in reversed(tiers):
        h = await start_node(str(shards), tier, next=nxt, inject_delay_ms=(delays or {}).get(tier, 0.0),
                             engine=TierConfig(micro_batches=1))
        handles.insert(0, h)
        nxt = f"127.0.0.1:{h.port}"
    return handles


class NodeChain:
    """Real relay nodes (device -> edge -> cloud) on loopback, hosted on an event loop in a daemon thread."""

    def __init__(self, shards, tiers=("device", "edge", "cloud"), delays_ms: dict | None = None):
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.shards, self.tiers, self.delays = shards, list(tiers), delays_ms or {}

    def call(self, coro, timeout: float = 60):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self):
        self.thread.start()
        self.handles = self.call(start_family(self.shards, self.tiers, self.delays))
        self.addresses = {t: f"127.0.0.1:{h.port}" for t, h in zip(self.tiers, self.handles)}
        self.head = self.addresses[self.tiers[0]]
        return self

    def live_sessions(self) -> dict[str, int]:
        """Live sessions per tier, from each node's Stats RPC."""
        async def go():
            from relay.client import RelayClient

            out = {}
            for t, addr in self.addresses.items():
                async with RelayClient(addr, timeout_s=5) as c:
                    out[t] = (await c.stats())["live_sessions"]
            return out

        return self.call(go())

    def __exit__(self, *exc):
        for h in self.handles:
            self.call(h.stop(grace=0.2))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


# ---- `familial-serve` as a real process ----------------------------------------------------------

def spawn_serve(args, **kw):
    """`python -m serving.cli ARGS` from the repository root, stdout+stderr merged, line-buffered text."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "serving.cli", *map(str, args)], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def wait_for(proc, pattern: str, timeout: float = 90):
    """(match, output so far) once `pattern` appears in the process's output; kills it and fails if not."""
    import re

    out, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        out += line
        m = re.search(pattern, out)
        if m:
            return m, out
    proc.kill()
    raise AssertionError(f"no {pattern!r} in output:\n{out}")


def stop(proc, sig=None) -> str:
    """SIGINT (or `sig`) and the rest of the output."""
    import signal
    import subprocess

    proc.send_signal(sig or signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return rest
