"""`python3 -m relay.cli` (what familial-serve's run_node does) starts a real node process from shards."""
import asyncio
import socket
import subprocess
import sys
import time

from relay.client import RelayClient
from tests.relay.relay_helpers import ROOT, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_process_serves_and_stops_on_sigterm(family):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "relay.cli", "--tier", "cloud", "--shards", str(family.shards),
                          "--port", str(port), "--max-sessions", "3"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def go():
            c = RelayClient(f"127.0.0.1:{port}", timeout_s=2)
            t0 = time.monotonic()
            while not await c.health():
                assert p.poll() is None, p.stdout.read()
                assert time.monotonic() - t0 < 60, "node did not come up"
                await asyncio.sleep(0.2)
            st = await c.stats()
            info = await c.family_info()
            await c.close()
            return st, info
        st, info = run(go())
        assert st["tier"] == "cloud" and st["limits"]["max_sessions"] == 3 and st["next"] == ""
        assert info["complete"] and info["tiers"][0]["exits"][-1]["index"] == family.model.cfg.G - 1
    finally:
        p.terminate()
        assert p.wait(timeout=20) == 0
