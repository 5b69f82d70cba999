"""Step time of the IsoFLOP study's runs on one GPU: eager steps against `--cuda-graph` and
`--compile-blocks`, alone and K processes at once, and where a step's kernel time goes.

    python benchmarks/isoflop/step_probe.py --out $OUT/step_probe.json                 # eager vs graph
    python benchmarks/isoflop/step_probe.py --modes eager graph graph+blocks --jobs 4  # with compiled blocks
    python benchmarks/isoflop/step_probe.py --profile --out $OUT/profile.json          # top kernels per step

Each probed run takes its model and trainer settings from study.yaml's plan (by name; default: the
smallest, a middle and the largest run left at 3e15 on 2026-12-03) and random tokens (a step's cost
does not depend on them). Per run and mode: milliseconds per step alone and the first losses, from the
same initialisation on the same batches, against the first mode's (a captured step must train as the
eager one). Then K processes of the middle run at once per mode, counting steps in a common window:
the aggregate FLOP/s the study gets when it runs K jobs. Writes JSON (and prints it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trunk.config import FamilyConfig  # noqa: E402
from trunk.model import FamilyModel  # noqa: E402
from trunk.sweep import load_sweep, plan_sweep  # noqa: E402
from trunk.train import (Dist, FamilyLossModule, GraphedStep, TrainConfig, TrainRun, autocast_dtype,  # noqa: E402
                         compile_blocks, make_optimizer, make_plan, train_step)

DATA = {"fingerprint": "0846f6d49e3c1df6", "train_tokens": 124562971, "val_tokens": 6852124, "vocab_size": 4096}
DEFAULT_RUNS = ["3e15-d128-L1-G1-s0", "3e15-d160-L4-G4-x1.2.3-s0", "3e15-d288-L11-G4-x3.6.8-s0"]
MODES = {"eager": (False, False), "graph": (True, False), "blocks": (False, True), "graph+blocks": (True, True)}


class RandomTokens:
    """train_batch(cursor, n, seed) of the real data, with random tokens fixed by the cursor."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def train_batch(self, cursor: int, n: int, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, cursor]).integers(0, self.vocab, (n, self.seq_len + 1), dtype=np.int64)


def spec_of(name: str):
    cfg = load_sweep(str(REPO / "benchmarks" / "isoflop" / "study.yaml"))
    runs = {r.name: r for r in plan_sweep(cfg, DATA).runs}
    if name not in runs:
        raise SystemExit(f"no run {name} in study.yaml's plan")
    return runs[name]


def make_stepper(spec, mode: str):
    """(step function, flops per step) for a fresh model of `spec` on the GPU, stepping as `mode`."""
    graph, blocks = MODES[mode]
    torch.manual_seed(0)
    mcfg = FamilyConfig.from_dict(spec.model)
    t = TrainConfig.from_dict({**spec.train, "cuda_graph": graph, "compile_blocks": blocks, "device": "cuda"})
    d = Dist(0, 1, torch.device("cuda"))
    plan = make_plan(mcfg, t, 1)
    model = FamilyModel(mcfg).to(d.device)
    if blocks:
        torch._dynamo.reset()  # one process, many shapes
        compile_blocks(model)
    net = FamilyLossModule(model, None)
    opt = make_optimizer(model, t)
    data = RandomTokens(mcfg.vocab_size, t.seq_len)
    amp = autocast_dtype(t, d.device)
    run = TrainRun(mcfg, t, plan, d, model, net, opt, data, None, amp, Path("/tmp"))
    fps = plan.flops_per_token * plan.global_batch * t.seq_len
    if graph:
        return GraphedStep(run), fps
    return (lambda s: train_step(s, net, opt, data, t, plan, d, amp)), fps


def alone(spec, mode: str, steps: int) -> dict:
    step, fps = make_stepper(spec, mode)
    losses = [float(step(s)) for s in range(8)]  # warm-up (and capture), read every step
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(8, 8 + steps):
        loss = step(s)
    float(loss)
    dt = (time.perf_counter() - t0) / steps
    return {"ms_per_step": round(dt * 1e3, 3), "flops_per_s": fps / dt, "first_losses": losses}


def kernel_profile(spec, mode: str, steps: int = 4, top: int = 15) -> dict:
    """GPU kernel time per step (torch.profiler) and the kernels that take most of it."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = make_stepper(spec, mode)
    for s in range(8):
        step(s)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for s in range(8, 8 + steps):
            step(s)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    rows = [(e.key, e.device_time_total / steps, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    busy = sum(r[1] for r in rows)
    return {"wall_ms_per_step": round(wall * 1e3, 3), "kernel_ms_per_step": round(busy / 1e3, 3),
            "kernels_per_step": sum(r[2] for r in rows),
            "top": [{"kernel": k[:90], "ms": round(us / 1e3, 3), "calls": c} for k, us, c in rows[:top]]}


def worker(name: str, mode: str, start_at: float, window: float) -> None:
    spec = spec_of(name)
    step, fps = make_stepper(spec, mode)
    s = 0
    while time.time() < start_at:
        step(s)
        s += 1
    torch.cuda.synchronize()
    s0, t0 = s, time.time()
    while time.time() < t0 + window:
        step(s)
        s += 1
        if s % 8 == 0:
            torch.cuda.synchronize()  # count steps done, not steps queued
    torch.cuda.synchronize()
    print(json.dumps({"steps": s - s0, "seconds": time.time() - t0, "flops": (s - s0) * fps}), flush=True)


def together(name: str, mode: str, k: int, window: float) -> dict:
    start_at = time.time() + (60.0 if MODES[mode][1] else 25.0)  # compiling takes longer than capturing
    cmd = [sys.executable, __file__, "--worker", name, "--start-at", str(start_at), "--window", str(window),
           "--worker-mode", mode]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    flops = sum(o["flops"] for o in outs)
    secs = max(o["seconds"] for o in outs)
    return {"jobs": k, "flops_per_s": flops / secs, "steps_per_s_each": [round(o["steps"] / o["seconds"], 1) for o in outs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "step_probe.json"),
                   help="JSON file to write (a folder: step_probe.json or profile.json inside it)")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="run names of study.yaml's plan")
    p.add_argument("--steps", type=int, default=60, help="timed steps per run and mode, alone")
    p.add_argument("--jobs", type=int, nargs="*", default=[3, 8], help="processes at once (the second run)")
    p.add_argument("--window", type=float, default=8.0, help="seconds counted when several run at once")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker-mode", default="eager", help=argparse.SUPPRESS)
    p.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=list(MODES),
                   help="ways to step: eager, graph (--cuda-graph), blocks (--compile-blocks), graph+blocks")
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help="only the kernel profile of each run, per mode")
    args = p.parse_args(argv)
    if Path(args.out).is_dir():  # a folder ($OUT): the file goes inside it
        args.out = str(Path(args.out) / ("profile.json" if args.profile else "step_probe.json"))
    if args.profile:
        res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "profiles": {}}
        for name in args.runs:
            spec = spec_of(name)
            res["profiles"][name] = {mode: kernel_profile(spec, mode) for mode in args.modes}
            print(json.dumps({name: res["profiles"][name]}), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    if args.worker:
        worker(args.worker, args.worker_mode, args.start_at, args.window)
        return 0
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "runs": {}, "together": []}
    for name in args.runs:
        spec = spec_of(name)
        row = {"N": spec.N, "steps": spec.steps}
        for mode in args.modes:
            try:
                row[mode] = alone(spec, mode, args.steps)
            except Exception as e:  # noqa: BLE001 -- a probe: say what failed and go on
                row[mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
        e = row[args.modes[0]]
        for mode in args.modes[1:]:  # against the first mode (eager by default)
            g = row[mode]
            if "ms_per_step" in e and "ms_per_step" in g:
                g["speedup"] = round(e["ms_per_step"] / g["ms_per_step"], 2)
                g["loss_max_diff"] = max(abs(a - b) for a, b in zip(e["first_losses"], g["first_losses"]))
        res["runs"][name] = row
        print(json.dumps({name: row}), flush=True)
    mid = args.runs[len(args.runs) // 2]
    for k in args.jobs:
        for mode in (args.modes if k == max(args.jobs) else args.modes[1:]):  # the first mode only at the most jobs
            try:
                res["together"].append({"run": mid, "mode": mode, **together(mid, mode, k, args.window)})
            except Exception as e:  # noqa: BLE001
                res["together"].append({"run": mid, "mode": mode, "jobs": k, "error": str(e)[:300]})
            print(json.dumps(res["together"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
