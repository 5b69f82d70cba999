"""Shared by the tests that run tiers as processes: stop them all, stopped (SIGSTOP) ones included."""
from __future__ import annotations

import signal
import subprocess


def stop_processes(procs) -> None:
    """Terminate every process still running (continuing a stopped one first: it would not act on
    SIGTERM), then wait for each, killing any that does not exit within 20 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
