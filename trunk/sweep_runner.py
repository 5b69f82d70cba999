"""IsoFLOP sweeps, part 2: run a plan, resumably, into one runs.jsonl.

Layout under the sweep's `out`:
    runs.jsonl          one run record per finished run (docs/run-record.md) plus the sweep's keys:
                        `sweep` (name, key, role, budget, epochs, wall seconds, device), `throughput`
                        (tokens/s, FLOP/s, MFU) and, for families, `exit_dense_loss` with `exit_dense`
    runs/<name>-<key>/  each run's trainer output: config.json, checkpoint, trainer state, metrics,
                        its own runs.jsonl, train.log (subprocess runs)
    .sweep.lock         held while a sweep runs here (a second sweep on the same folder is refused)
A run is done when its key is in runs.jsonl. A family's record is appended once every dense baseline
of its exits is done (its `exit_dense_loss` needs their losses); until then it waits in its run folder.
A run killed mid-way resumes from its last save point (`resume: auto`); one whose record is in its
folder but not in runs.jsonl (killed between the two writes) is collected, not re-run.

Runs go one after another in this process (`jobs` 1), or as `jobs` subprocesses at once (tiny models
cannot fill a GPU alone; with several GPUs each job gets its own), each optionally under torchrun
with `nproc_per_run` processes. Child processes die with the sweep (Linux PR_SET_PDEATHSIG, set by a
stub that then execs the run).
With a time limit, runs whose estimate does not fit are left for the next call, and runs still going
at the limit are stopped (they resume from their last save point next time).
This file does not plan (trunk/sweep.py) and does not parse arguments (trunk/sweep_cli.py).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trunk.sweep import RunSpec, SweepError, SweepPlan

# bf16 dense peak of the device, for MFU (datasheets); other devices need --peak-flops.
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
_STATE = "trainer_state.pt"
_REPO = Path(__file__).resolve().parents[1]


@dataclass
class RunnerOptions:
    jobs: int = 1               # runs at once (1 = one after another in this process)
    nproc_per_run: int = 1      # processes per run (torchrun, DDP); > 1 always launches subprocesses
    time_limit: float = 0.0     # seconds for this call; 0 = no limit
    peak_flops: float = 0.0     # device peak FLOP/s for MFU; 0 = from PEAK_BF16 by device name
    progress: bool = True
    poll_s: float = 0.5


# ---- the ledger: runs.jsonl ----------------------------------------------------------------------

class Ledger:
    """The sweep's runs.jsonl: records by key; a partial last line (killed mid-write) is dropped."""

    def __init__(self, out: Path, repair: bool = True):
        self.path = out / "runs.jsonl"
        self.done: dict[str, dict] = {}
        self.repaired = False
        if not self.path.is_file():
            return
        text = self.path.read_text()
        lines = text.splitlines()
        if text and not text.endswith("\n"):
            lines, self.repaired = lines[:-1], True
        good = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["sweep"]["key"]
            except (ValueError, KeyError, TypeError):
                raise SweepError(f"{self.path}:{n}: not a sweep run record") from None
            self.done[key] = rec
            good.append(line)
        if self.repaired and repair:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in good))
            os.replace(tmp, self.path)

    def append(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[rec["sweep"]["key"]] = rec


def run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / f"{spec.name}-{spec.key}"


def _finished_record(d: Path) -> dict | None:
    p = d / "runs.jsonl"
    if not p.is_file():
        return None
    lines = [l for l in p.read_text().splitlines() if l.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


# ---- device and estimates ------------------------------------------------------------------------

def device_info(opts: RunnerOptions) -> dict:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        n = torch.cuda.device_count()
    else:
        import platform

        name, n = f"cpu ({os.cpu_count()} cores, {platform.machine()})", 0
    peak = opts.peak_flops or next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    return {"name": name, "gpus": n, "torch": torch.__version__, "peak_flops": peak or None,
            "jobs": opts.jobs, "nproc_per_run": opts.nproc_per_run}


class Estimator:
    """Seconds a run will take: like the nearest measured run (in log N) of this sweep, else a default rate.

    Runs of the run's own budget are preferred when there are any: they ran with this call's settings
    (jobs at once, CUDA graphs), which can change a small run's rate several times over.
    """

    def __init__(self, done: dict, default_rate: float, overhead_s: float):
        self.points = []
        for r in done.values():
            if r.get("sweep", {}).get("wall_seconds"):
                self.add(r)
        self.default_rate, self.overhead_s = default_rate, overhead_s

    def seconds(self, spec: RunSpec) -> float:
        same = [p for p in self.points if p[2] == spec.budget]
        points = same or self.points
        if points:
            _, rate, _ = min(points, key=lambda p: abs(math.log(p[0] / spec.N)))
            return spec.flops / rate
        return self.overhead_s + spec.flops / self.default_rate

    def add(self, rec: dict) -> None:
        self.points.append((rec["N"], rec["flops_total"] / rec["sweep"]["wall_seconds"],
                            rec["sweep"].get("budget")))


def default_rate(cfg_rate: float) -> float:
    import torch

    return cfg_rate or (2e13 if torch.cuda.is_available() else 2e9)


# ---- completing records --------------------------------------------------------------------------

def _complete(rec: dict, spec: RunSpec, plan: SweepPlan, wall: float, dev: dict) -> dict:
    tput = dict(rec.get("throughput") or {})
    tok_s = tput.get("tokens_per_s")
    if tok_s:
        tput["flops_per_s"] = spec.flops_per_token * tok_s
        tput["mfu"] = tput["flops_per_s"] / dev["peak_flops"] if dev.get("peak_flops") else None
    rec["throughput"] = tput
    rec["sweep"] = {"name": spec.name, "key": spec.key, "role": spec.role, "budget": spec.budget,
                    "size_index": spec.size_index, "target_N": spec.target_N, "seed": spec.seed,
                    "epochs": spec.epochs, "data": plan.data["fingerprint"],
                    "dense_baselines": plan.config.dense_baselines, "wall_seconds": round(wall, 3),
                    "device": dev, "source": plan.config.source}
    return rec


def _with_dense(rec: dict, spec: RunSpec, ledger: Ledger, mode: str) -> dict:
    base = [ledger.done[k] for k in spec.dense_for_exits]
    rec["exit_dense_loss"] = [b["exit_val_loss"][-1] for b in base]
    rec["exit_dense"] = {"definition": mode, "runs": [b["sweep"]["name"] for b in base],
                         "D": [b["D"] for b in base], "N": [b["N"] for b in base]}
    return rec


# ---- launching runs ------------------------------------------------------------------------------

# Runs start through this stub: it asks the kernel to send SIGTERM when the sweep dies (PR_SET_PDEATHSIG,
# kept across exec), leaves if the sweep is already gone, then becomes the run. Done in the child's own
# code rather than a preexec_fn, which is unsafe once the sweep has threads (tqdm, CUDA).
_DIE_WITH_PARENT = """import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(1)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def prepare_run_dir(out: Path, spec: RunSpec, data: str, progress: bool) -> Path:
    """Write the run's config.json; drop a trainer state already at the last step (its record was lost)."""
    from trunk.checkpoint import read_meta

    d = run_dir(out, spec)
    d.mkdir(parents=True, exist_ok=True)
    if (d / _STATE).is_file():
        try:
            at_end = read_meta(d).get("step", 0) >= spec.steps
        except Exception:  # an unreadable checkpoint: start over
            at_end = True
        if at_end:
            (d / _STATE).unlink()
    train = {**spec.train, "data": str(Path(data).resolve()), "out": str(d.resolve()), "resume": "auto",
             "progress": progress}
    tmp = d / "config.json.tmp"
    tmp.write_text(json.dumps({"model": spec.model, "train": train}, indent=1) + "\n")
    os.replace(tmp, d / "config.json")
    return d


def _command(d: Path, nproc: int) -> list[str]:
    cfg = str(d / "config.json")
    stub = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid())]
    if nproc > 1:
        return stub + ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       "-m", "trunk.cli", "train", "--config", cfg]
    return stub + ["-m", "trunk.cli", "train", "--config", cfg]


def _env(slot: int, opts: RunnerOptions, dev: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if dev["gpus"] > 1:
        k = opts.nproc_per_run
        first = (slot * k) % dev["gpus"]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str((first + i) % dev["gpus"]) for i in range(k))
    return env


@dataclass
class _Running:
    spec: RunSpec
    proc: subprocess.Popen
    t0: float
    log: object
    slot: int


def _progress_of(d: Path, spec: RunSpec) -> float:
    """Fraction of the run's steps done, from the last line of its metrics.jsonl."""
    p = d / "metrics.jsonl"
    try:
        with open(p, "rb") as f:
            f.seek(max(0, p.stat().st_size - 512))
            last = f.read().splitlines()[-1]
        return min(1.0, json.loads(last)["step"] / spec.steps)
    except (OSError, ValueError, KeyError, IndexError):
        return 0.0


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every run's process group at once, SIGKILL what is left after `grace` seconds."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + grace
    for p in procs:
        try:
            p.wait(max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


# ---- the sweep -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    finished: list = field(default_factory=list)   # records appended in this call
    waiting: list = field(default_factory=list)    # family runs done, waiting for dense baselines
    deferred: list = field(default_factory=list)   # not started: they would not fit the time limit
    stopped: list = field(default_factory=list)    # stopped at the time limit (resume next call)
    failed: list = field(default_factory=list)     # (name, one-line reason)
    seconds: float = 0.0
    flops: float = 0.0
    device: dict = field(default_factory=dict)


class Sweep:
    """Runs a plan's remaining runs and keeps runs.jsonl complete; `run()` returns an Outcome."""

    def __init__(self, plan: SweepPlan, opts: RunnerOptions):
        self.plan, self.opts = plan, opts
        self.out = Path(plan.config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.out)
        self.dev = device_info(opts)
        self.est = Estimator(self.ledger.done, default_rate(plan.config.estimate.flops_per_s),
                             plan.config.estimate.overhead_s)
        self.by_key = {s.key: s for s in plan.runs}
        self.waiting: dict[str, dict] = {}
        self.result = Outcome(device=self.dev)
        self.t0 = time.time()

    # -- bookkeeping --
    def todo(self) -> list[RunSpec]:
        return [s for s in self.plan.runs if s.key not in self.ledger.done]

    def _deps_done(self, spec: RunSpec) -> bool:
        return all(k in self.ledger.done for k in spec.dense_for_exits)

    def finish(self, spec: RunSpec, rec: dict, wall: float, trained_now: bool = True) -> None:
        rec = _complete(rec, spec, self.plan, wall, self.dev)
        self.est.add(rec)
        self.result.flops += spec.flops if trained_now else 0.0
        self.waiting[spec.key] = rec
        self._flush()

    def _flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for key, rec in list(self.waiting.items()):
                spec = self.by_key[key]
                if self._deps_done(spec):
                    if spec.dense_for_exits:
                        rec = _with_dense(rec, spec, self.ledger, self.plan.config.dense_baselines)
                    self.ledger.append(rec)
                    self.result.finished.append(rec)
                    del self.waiting[key]
                    moved = True

    def collect_orphans(self) -> list[RunSpec]:
        """Runs whose record sits in their folder (finished earlier, not yet in runs.jsonl)."""
        left = []
        for spec in self.todo():
            rec = _finished_record(run_dir(self.out, spec))
            if rec is not None and rec.get("steps") == spec.steps:
                self.finish(spec, rec, float(rec.get("train_seconds", 0.0)) or 1e-9, trained_now=False)
            else:
                left.append(spec)
        return left

    def fits(self, spec: RunSpec) -> bool:
        if not self.opts.time_limit:
            return True
        return time.time() - self.t0 + self.est.seconds(spec) <= self.opts.time_limit

    def run(self) -> Outcome:
        import fcntl

        with open(self.out / ".sweep.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise SweepError(f"{self.out}: another sweep is running in this folder") from None
            return self._run()

    def _run(self) -> Outcome:
        from tqdm import tqdm

        todo = [s for s in self.collect_orphans() if s.key not in self.waiting]
        total = sum(s.flops for s in todo)
        self.bar = tqdm(total=total, unit="FLOP", unit_scale=True, desc="sweep", disable=not self.opts.progress,
                        smoothing=0.1)
        try:
            if self.opts.jobs == 1 and self.opts.nproc_per_run == 1:
                self._in_process(todo)
            else:
                self._subprocesses(todo)
        finally:
            self.bar.close()
        self.result.waiting = [self.by_key[k].name for k in self.waiting]
        self.result.seconds = time.time() - self.t0
        return self.result

    # -- one after another, in this process --
    def _in_process(self, todo: list[RunSpec]) -> None:
        from trunk.cli import USER_ERRORS
        from trunk.config import FamilyConfig
        from trunk.train import TrainConfig, train

        for spec in todo:
            if not self.fits(spec):
                self.result.deferred.append(spec.name)
                continue
            d = prepare_run_dir(self.out, spec, self.plan.config.data, progress=self.opts.progress)
            cfg = json.loads((d / "config.json").read_text())
            if cfg["train"].get("compile") or cfg["train"].get("compile_blocks"):
                import torch

                torch._dynamo.reset()  # one process, many shapes: do not hit dynamo's recompile limit
            t0 = time.time()
            try:
                rec = train(FamilyConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"]))
            except USER_ERRORS as e:
                self.result.failed.append((spec.name, " ".join(str(e).split())))
                continue
            except RuntimeError as e:  # e.g. out of memory: this run fails, the sweep goes on
                self.result.failed.append((spec.name, " ".join(str(e).split())[:300]))
                continue
            self.finish(spec, _finished_record(d) or rec, time.time() - t0)
            self.bar.update(spec.flops)

    # -- several at once, as subprocesses --
    def _launch(self, spec: RunSpec, slot: int) -> _Running:
        d = prepare_run_dir(self.out, spec, self.plan.config.data, progress=False)
        log = open(d / "train.log", "a")
        proc = subprocess.Popen(_command(d, self.opts.nproc_per_run), stdout=log, stderr=subprocess.STDOUT,
                                env=_env(slot, self.opts, self.dev), start_new_session=True)
        return _Running(spec, proc, time.time(), log, slot)

    def _reap(self, r: _Running) -> None:
        r.log.close()
        d = run_dir(self.out, r.spec)
        rec = _finished_record(d)
        if r.proc.returncode == 0 and rec is not None and rec.get("steps") == r.spec.steps:
            self.finish(r.spec, rec, time.time() - r.t0)
            return
        tail = (d / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        self.result.failed.append((r.spec.name, f"exit {r.proc.returncode}: {tail[0][:300]}"))

    def _subprocesses(self, todo: list[RunSpec]) -> None:
        queue, running, done_flops = list(todo), {}, 0.0
        try:
            while queue or running:
                free = [s for s in range(self.opts.jobs) if s not in running]
                while free and queue:
                    spec = queue.pop(0)
                    if self.fits(spec):
                        slot = free.pop(0)
                        running[slot] = self._launch(spec, slot)
                    else:
                        self.result.deferred.append(spec.name)
                for slot, r in list(running.items()):
                    if r.proc.poll() is not None:
                        self._reap(r)
                        done_flops += r.spec.flops
                        del running[slot]
                if self.opts.time_limit and time.time() - self.t0 > self.opts.time_limit and running:
                    _stop([r.proc for r in running.values()])
                    for r in running.values():
                        r.log.close()
                        self.result.stopped.append(r.spec.name)
                    running = {}
                    self.result.deferred.extend(s.name for s in queue)
                    queue = []
                partial = sum(r.spec.flops * _progress_of(run_dir(self.out, r.spec), r.spec) for r in running.values())
                self.bar.n = min(self.bar.total, done_flops + partial)
                self.bar.refresh()
                if running:
                    time.sleep(self.opts.poll_s)
        finally:
            _stop([r.proc for r in running.values()])  # Ctrl-C or an error here: leave no run behind
            for r in running.values():
                r.log.close()
