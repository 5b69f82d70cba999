"""The demo's relay nodes: one `python -m relay.cli` process per tier on loopback, as a real family runs.

Each tier is its own process (its own interpreter, event loop and torch threads), so the tiers and the
router do not take turns on one interpreter lock. Measured on the 2-core CPU with the built-in family
(2026-12-03, 32-token streams): in one process 1 client 155 and 16 clients 540-600 tok/s (the one event
loop at 100 % of a core); as processes 135-142 and 726-741 tok/s.

Nodes run without micro-batches (`--micro-batches 1`): on 2 cores the tiers cannot all compute at once,
and splitting a step only adds steps (16 clients: 626-684 tok/s with two, 726-741 without). Each node gets
an equal share of the cores as torch threads unless OMP_NUM_THREADS is set.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from trunk.cmdline import fail

READY = re.compile(r"serving on 127\.0\.0\.1:(\d+)")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the demo process dies, even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:  # resolved before any fork: the child only calls it
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


class LocalFamily:
    """Start `tiers` (head first) as node processes on free loopback ports, all at once (a node dials its
    --next lazily), and wait until each serves. Node output goes to stderr prefixed with the node's name
    (`echo`) and, with `log_dir`, to `log_dir/NAME.log`; `tail[name]` keeps its last lines.
    `delays` (tier -> ms after every engine step; tests and benchmarks only) runs the nodes through
    `tests/slow_tiers.py`, which only a checkout has. `heads` names several head nodes of the first tier,
    all dialling the second; `args` go to every node, `node_args[name]` and `env[name]` to one.
    `micro_batches` (the demo: 1, see above) is passed as --micro-batches unless None (the node's default)."""

    def __init__(self, shards: Path, tiers: list[str], delays: dict[str, float] | None = None,
                 start_timeout_s: float = 120.0, *, heads: tuple[str, ...] | None = None, args: list[str] = (),
                 node_args: dict[str, list[str]] | None = None, env: dict[str, dict[str, str]] | None = None,
                 log_dir: Path | None = None, echo: bool = True, micro_batches: int | None = 1):
        self.shards, self.tiers, self.delays = Path(shards), list(tiers), dict(delays or {})
        self.start_timeout_s = start_timeout_s
        self.args, self.node_args, self.node_env = list(args), dict(node_args or {}), dict(env or {})
        self.log_dir, self.echo, self.micro_batches = log_dir, echo, micro_batches
        # (node name, tier, name of the node it dials): the chain, with the head tier as `heads` nodes
        self.heads = list(heads or [self.tiers[0]])
        nxt = self.tiers[1] if len(self.tiers) > 1 else None
        self.nodes = [(h, self.tiers[0], nxt) for h in self.heads] + [
            (t, t, self.tiers[i + 1] if i + 1 < len(self.tiers) else None) for i, t in enumerate(self.tiers) if i > 0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self._ready: dict[str, threading.Event] = {n: threading.Event() for n, _, _ in self.nodes}
        self.tail: dict[str, list[str]] = {n: [] for n, _, _ in self.nodes}   # each node's last 40 output lines
        self.stopping = False

    def _command(self, name: str, tier: str, port: int, nxt: str | None) -> list[str]:
        if self.delays:  # familial-serve with a per-step delay on this tier (no production flag does that)
            cmd = [sys.executable, "-m", "tests.slow_tiers", f"{tier}={self.delays.get(tier, 0.0)}"]
        else:
            cmd = [sys.executable, "-m", "relay.cli"]
        cmd += ["--tier", tier, "--shards", str(self.shards), "--port", str(port)]
        if self.micro_batches is not None:
            cmd += ["--micro-batches", str(self.micro_batches)]
        cmd += [*self.args, *self.node_args.get(name, [])]
        return cmd + (["--next", nxt] if nxt else [])

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(self.nodes))))
        root = str(Path(__file__).resolve().parents[1])  # a checkout run without installing; tests.slow_tiers
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return env | self.node_env.get(name, {})

    def _pump(self, name: str) -> None:
        log = open(self.log_dir / f"{name}.log", "w", buffering=1) if self.log_dir else None
        try:
            for line in self.procs[name].stdout:
                line = line.rstrip("\n")
                self.tail[name] = (self.tail[name] + [line])[-40:]
                if not self._ready[name].is_set() and READY.search(line):
                    self._ready[name].set()
                if log:
                    print(line, file=log)
                if self.echo:
                    print(f"[{name}] {line}", file=sys.stderr, flush=True)
        finally:
            if log:
                log.close()

    def start(self) -> "LocalFamily":
        ports = _free_ports(len(self.nodes))
        self.addresses = {n: f"127.0.0.1:{p}" for (n, _, _), p in zip(self.nodes, ports)}
        try:
            for (name, tier, nxt), port in zip(self.nodes, ports):
                self.procs[name] = subprocess.Popen(
                    self._command(name, tier, port, nxt and self.addresses[nxt]), env=self._env(name),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    start_new_session=True,  # Ctrl-C reaches the demo only
                    preexec_fn=_die_with_parent)
                threading.Thread(target=self._pump, args=(name,), daemon=True, name=f"{name}-output").start()
            deadline = time.time() + self.start_timeout_s
            for name, _, _ in self.nodes:
                while not self._ready[name].wait(0.1):
                    code = self.procs[name].poll()
                    if code is not None or time.time() > deadline:
                        last = next((l for l in reversed(self.tail[name]) if l.strip()), "no output")
                        why = f"exited with status {code}" if code is not None else \
                            f"not serving after {self.start_timeout_s:.0f} s"
                        fail(f"the {name} node {why}: {last.strip()}")
        except BaseException:
            self.stop()
            raise
        return self

    def log(self, name: str) -> str:
        """A node's last output lines."""
        return "\n".join(self.tail[name])

    async def chain_complete(self, timeout_s: float = 60.0) -> None:
        """Wait until the head reports the whole chain (FamilyInfo complete). The nodes start at once, so a
        node may have dialled its --next before it listened; gRPC then retries after a backoff (~1 s)."""
        import asyncio

        from relay.client import RelayClient

        deadline, why = time.monotonic() + timeout_s, "no answer"
        for head in self.heads:
            async with RelayClient(self.addresses[head], timeout_s=5) as c:
                while True:
                    try:
                        info = await c.family_info()
                        if info["complete"]:
                            break
                        why = f"tiers {[t['tier'] for t in info['tiers']]} of {self.tiers}"
                    except Exception as e:  # noqa: BLE001 - not up yet: ask again
                        why = f"{type(e).__name__}: {e}"
                    if self.dead():
                        fail(f"the relay chain {' -> '.join(self.tiers)} did not come up: nodes exited {self.dead()}")
                    if time.monotonic() > deadline:
                        fail(f"the relay chain {' -> '.join(self.tiers)} did not come up in {timeout_s:.0f} s: {why}")
                    await asyncio.sleep(0.2)

    def dead(self) -> dict[str, int]:
        """Nodes whose process has exited, with its status."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every node (each drains and stops its gRPC server; a stopped one is continued first, or
        it would not act on it), then wait; kill any that is late."""
        self.stopping = True
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        deadline = time.time() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
