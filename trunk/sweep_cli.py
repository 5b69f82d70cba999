"""`familial-train sweep SWEEP.yaml`: plan an IsoFLOP sweep, print the plan, run what is not done yet.

Only argument parsing and printing live here; planning is `trunk/sweep.py`, running
`trunk/sweep_runner.py`. Errors in the sweep file end as one line (SweepError, raised to
`trunk/cli.py`, which prints it and exits 2).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from trunk.sweep import SweepError, SweepPlan, load_sweep, plan_sweep

# Every key of a sweep file, for --help (a test checks that each dataclass field is listed).
SWEEP_KEYS = """\
sweep file (YAML or JSON; examples/sweep.yaml has every key):
  out              folder for runs.jsonl and one folder per run
  data             a `familial-train prepare` folder (its vocab sizes the models)
  vocab_size       model vocabulary (default: the data's); lets --dry-run plan without data
  budgets          compute budgets C in FLOPs (trunk.flops full count), e.g. [1e15, 3e15]
  sizes            target non-embedding N: a list, or {N: [...]}, or
                   {n_opt_multiples: [0.25, 0.5, 1, 2, 4], law: {A, alpha, B, beta} | fit.json}
  G                numbers of exits, e.g. [1, 2, 3, 4]
  exits            'uniform' (exit g of G at g/G of the depth) or {G: [fractions]}
  dense_baselines  same_compute (dense model of each exit's depth on the family's C) | same_D
                   (on the family's D tokens) | off; their losses go into exit_dense_loss
  seeds            seeds, each run once per seed (default: [0])
  shape            width/depth rule: head_dim, width_multiple, aspect_ratio (d_model / n_layers),
                   aspect_tolerance, min_layers, max_layers, max_width, kv_ratio, ffn_ratio,
                   ffn_multiple; other FamilyConfig fields (qkv_bias, rope_theta, ...) pass through
  train            seq_len, lr, min_lr_frac, warmup_frac (of the steps), target_steps (the global
                   batch is D / (target_steps * seq_len) as a power of two in [min_batch, max_batch]),
                   micro_batch, eval_sequences (one validation set for all runs), eval_points,
                   save_points (resume points), threads; other TrainConfig fields (dtype, compile,
                   weight_decay, ...) pass through
  estimate         flops_per_s, overhead_s: time estimates until runs of this sweep are measured
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sweep", help="plan and run an IsoFLOP sweep (budgets x sizes x G, dense baselines) into one runs.jsonl",
        epilog=SWEEP_KEYS,
        description="Plan every run of an IsoFLOP sweep from a sweep file, print the plan with estimated time and "
                    "epochs, and run the runs not yet in <out>/runs.jsonl (so a second call resumes an interrupted "
                    "sweep). Each finished run appends its run record; a family's record carries exit_dense_loss "
                    "from its dense baselines, for `familial-fit --law branch`.")
    p.add_argument("config", metavar="SWEEP.yaml", help="the sweep file")
    p.add_argument("--dry-run", action="store_true", help="print the plan (done / to run, estimates) and exit")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once: 1 = one after another in this process; N > 1 = N subprocesses (several "
                        "tiny models share one GPU; with several GPUs job i uses GPU i mod #GPUs)")
    p.add_argument("--nproc-per-run", type=int, default=1,
                   help="processes per run under torchrun (DDP over that many GPUs, or gloo on CPU)")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="stop starting runs whose estimate does not fit, and stop runs still going at the limit "
                        "(they resume from their last save point next call) (default: 0 = none)")
    p.add_argument("--budgets", default="", metavar="C,C",
                   help="only these of the file's budgets this call, e.g. 1e15 (default: all)")
    p.add_argument("--out", default=None, help="override the sweep file's out folder")
    p.add_argument("--data", default=None, help="override the sweep file's data folder")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="device peak FLOP/s for MFU (default: the bf16 datasheet peak of known GPUs; none on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every run of this call, or not (default: the file's train.compile); "
                        "not part of a run's identity, so finished runs stay done")
    p.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each run's decoder blocks, or not (default: the file's train.compile_blocks); "
                        "the fused loss stays eager, combines with --cuda-graph; not part of a run's identity")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each run's whole optimizer step in one CUDA graph, or not (default: the file's "
                        "train.cuda_graph); for small models, whose eager steps are launch-bound; not part of a "
                        "run's identity")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}".replace("e+0", "e").replace("e+", "e")


def describe_plan(plan: SweepPlan, done: set, est, jobs: int) -> str:
    cfg, d = plan.config, plan.data
    todo = [r for r in plan.runs if r.key not in done]
    lines = [f"sweep {cfg.source}: {len(plan.runs)} runs over {len(cfg.budgets)} budget(s), {len(plan.runs) - len(todo)} "
             f"done, {len(todo)} to run; data {d['train_tokens']:,} train / {d['val_tokens']:,} val tokens, vocab "
             f"{d['vocab_size']} (fingerprint {d['fingerprint']}); dense baselines: {cfg.dense_baselines}"]
    for C, (N, shape) in sorted(plan.n_opt.items()):
        lines.append(f"  N_opt at C={_fmt(C)} ({cfg.sizes.law_source} law, full FLOP count): {N:,} ({shape})")
    lines.append(f"  {'':4} {'run':40} {'role':5} {'N':>10} {'N_total':>10} {'D':>9} {'steps':>6} {'batch':>9} "
                 f"{'warmup':>6} {'epochs':>6} {'est s':>7}")
    for r in plan.runs:
        t = r.train
        batch = f"{t['batch_size']}x{t['grad_accum']}" + (f"x{plan.world}" if plan.world > 1 else "")
        ep = "-" if math.isnan(r.epochs) else f"{r.epochs:.3g}"
        lines.append(f"  {'done' if r.key in done else 'todo':4} {r.name:40} {r.role:5} {r.N:>10,} {r.N_total:>10,} "
                     f"{_fmt(r.tokens):>9} {r.steps:>6} {batch:>9} {t['warmup_steps']:>6} {ep:>6} "
                     f"{est.seconds(r):>7.1f}")
    secs = sum(est.seconds(r) for r in todo)
    epochs = [r.epochs for r in plan.runs if not math.isnan(r.epochs)]
    lines.append(f"to run: {len(todo)} runs, {_fmt(sum(r.flops for r in todo))} FLOPs, ~{secs:.0f} s of run time, "
                 f"~{secs / max(1, jobs):.0f} s wall with {jobs} job(s)"
                 + (f"; epochs per run {min(epochs):.2f}-{max(epochs):.2f}" if epochs else ""))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def describe_outcome(res, plan: SweepPlan) -> str:
    lines = [f"  {'run':40} {'G':>2} {'N':>10} {'D':>9} {'loss':>7} {'exit losses':24} {'tok/s':>9} {'MFU':>6} {'s':>7}"]
    for rec in res.finished:
        t = rec.get("throughput") or {}
        mfu = f"{t['mfu']:.1%}" if t.get("mfu") is not None else "-"
        tok = f"{t['tokens_per_s']:.3g}" if t.get("tokens_per_s") else "-"
        ex = " ".join(f"{v:.3f}" for v in rec["exit_val_loss"])
        lines.append(f"  {rec['sweep']['name']:40} {rec['G']:>2} {rec['N']:>10,} {_fmt(rec['D']):>9} {rec['loss']:>7.4f} "
                     f"{ex:24} {tok:>9} {mfu:>6} {rec['sweep']['wall_seconds']:>7.1f}")
    rate = res.flops / res.seconds if res.seconds else 0.0
    peak = res.device.get("peak_flops")
    share = f", {rate / peak:.1%} of the device's peak" if peak else ""
    lines.append(f"this call on {res.device['name']}: {len(res.finished)} record(s) written, {_fmt(res.flops)} FLOPs "
                 f"trained in {res.seconds:.0f} s ({_fmt(rate)} FLOP/s{share})")
    for what, names in (("waiting for dense baselines", res.waiting), ("left for a later call (time limit)",
                                                                       res.deferred),
                        ("stopped at the time limit (resume next call)", res.stopped)):
        if names:
            lines.append(f"{len(names)} run(s) {what}: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    for name, why in res.failed:
        lines.append(f"FAILED {name}: {why}")
    return "\n".join(lines)


def _select_budgets(cfg, spec: str) -> None:
    if not spec:
        return
    try:
        want = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"--budgets expects comma-separated numbers, got {spec!r}") from None
    keep = [C for C in cfg.budgets if any(abs(math.log(C / w)) < 1e-6 for w in want if w > 0)]
    if len(keep) != len(want):
        raise SweepError(f"--budgets {spec}: not all of them are budgets of the sweep file ({cfg.budgets})")
    cfg.budgets = keep


def run_sweep(args) -> int:
    from trunk.sweep_runner import Estimator, Ledger, RunnerOptions, Sweep, default_rate

    if args.jobs < 1 or args.nproc_per_run < 1 or args.time_limit < 0 or args.peak_flops < 0:
        raise SweepError("--jobs and --nproc-per-run must be >= 1, --time-limit and --peak-flops >= 0")
    cfg = load_sweep(args.config)
    cfg.out = args.out or cfg.out
    cfg.data = args.data or cfg.data
    _select_budgets(cfg, args.budgets)
    if args.compile is not None:
        cfg.train.fields["compile"] = args.compile
    if args.cuda_graph is not None:
        cfg.train.fields["cuda_graph"] = args.cuda_graph
    if args.compile_blocks is not None:
        cfg.train.fields["compile_blocks"] = args.compile_blocks
    plan = plan_sweep(cfg, world=args.nproc_per_run)

    if args.dry_run:
        ledger_done = Ledger(Path(cfg.out), repair=False).done
        est = Estimator(ledger_done, default_rate(cfg.estimate.flops_per_s), cfg.estimate.overhead_s)
        print(describe_plan(plan, set(ledger_done), est, args.jobs))
        return 0
    opts = RunnerOptions(jobs=args.jobs, nproc_per_run=args.nproc_per_run, time_limit=args.time_limit,
                         peak_flops=args.peak_flops, progress=not args.no_progress)
    sweep = Sweep(plan, opts)
    print(describe_plan(plan, set(sweep.ledger.done), sweep.est, args.jobs), flush=True)
    res = sweep.run()
    print(describe_outcome(res, plan))
    n = sum(r.key in sweep.ledger.done for r in plan.runs)
    print(f"{cfg.out}/runs.jsonl: {n} of the {len(plan.runs)} planned runs recorded")
    return 1 if res.failed else 0
