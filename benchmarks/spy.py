"""Where processes spend their time during a benchmark phase: py-spy around it, summarised.

    rec = Recorder({"edge": pid, ...}, out_dir, rate=200)   # starts `py-spy record` per process
    ...                                                      # the phase
    summary = rec.stop()                                     # {"edge": {"samples", "idle", "top", "self"}, ...}

py-spy samples the Python stacks of a running process from outside (no change to it); `--nonblocking`
keeps the target running while it reads. The summary gives, per process, the share of busy samples in
which each function is on the stack (`top`, inclusive; the event loop's own frames left out) and at its
top (`self`); samples whose innermost frame waits (the event loop's select, a queue or lock wait, a
thread blocked in native code) count as idle. py-spy is an optional tool (`pip install py-spy`):
`find()` says whether it is here.
"""
from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

IDLE_LEAVES = ("select", "poll", "epoll", "wait", "_worker", "sleep", "accept", "recv")
IDLE_EXACT = {"Thread.run"}  # a thread blocked in native code (gRPC's poller): no Python frame above run()
# frames every busy sample of an asyncio process passes through: they say nothing, so `top` leaves them out
CONTROL = {"<module>", "_run_module_as_main", "_run_code", "main", "run", "Runner.run", "main.<locals>.<lambda>",
           "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever", "BaseEventLoop._run_once",
           "Handle._run", "Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run"}


def find() -> str | None:
    """The py-spy executable: on PATH, or in a --target install's bin/ next to a sys.path entry."""
    exe = shutil.which("py-spy")
    if exe:
        return exe
    for p in sys.path:
        cand = Path(p) / "bin" / "py-spy"
        if cand.is_file():
            return str(cand)
    return None


def summarise(raw: str, top: int = 25) -> dict:
    """Shares of samples per function from py-spy's raw (collapsed) output: `f1;f2;...;fn count` lines."""
    incl: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = [f.split(" (")[0] for f in stack.split(";")]
        total += n
        if frames[-1] in IDLE_EXACT or any(w in frames[-1].lower() for w in IDLE_LEAVES):
            idle += n
            continue
        leaf[frames[-1]] += n
        for f in set(frames) - CONTROL:
            incl[f] += n
    busy = max(1, total - idle)
    return {"samples": total, "idle": round(idle / max(1, total), 3),
            "top": [[f, round(c / busy, 3)] for f, c in incl.most_common(top)],
            "self": [[f, round(c / busy, 3)] for f, c in leaf.most_common(top)]}


class Recorder:
    """`py-spy record` on each named process until stop(); raw output files under `out`."""

    def __init__(self, pids: dict[str, int], out: Path, rate: int = 200, exe: str | None = None,
                 max_s: int = 600):
        self.exe = exe or find()
        if self.exe is None:
            raise RuntimeError("py-spy not found (pip install py-spy)")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.procs = {}
        for name, pid in pids.items():
            cmd = [self.exe, "record", "-p", str(pid), "-r", str(rate), "-d", str(max_s), "-f", "raw",
                   "--nonblocking", "-o", str(self.out / f"spy_{name}.txt")]
            self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self, timeout_s: float = 30.0) -> dict:
        """Stop recording (py-spy writes its file on SIGINT) and summarise each process."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        out = {}
        for name, p in self.procs.items():
            try:
                _, err = p.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            f = self.out / f"spy_{name}.txt"
            out[name] = (summarise(f.read_text()) if f.is_file()
                         else {"error": (err or "").strip().splitlines()[-1:] or [f"py-spy exited {p.returncode}"]})
        return out
