"""The IsoFLOP study on one GPU: corpus, sweep and results into $OUT, resumable across device calls.

    PYTHONUNBUFFERED=1 python3 benchmarks/isoflop/study.py --out "$OUT"              # one H200 call
    python benchmarks/isoflop/study.py --out /tmp/iso --smoke                         # CPU check, ~1 min

Each call
1. prepares the corpus once per machine under --work (`familial-train prepare --preset pycorpus
   --tokenizer bpe --vocab-size 4096`: the Python installed there), reusing --results/tokenizer.json
   when it exists, so every call tokenizes the same documents the same way;
2. carries on from earlier calls: the sweep's runs.jsonl is the union, by run key, of
   --results/runs.jsonl (commit each call's $OUT/runs.jsonl there) and the one a warm machine still
   holds under --work; runs of another corpus (data fingerprint) are refused, not mixed; runs stopped
   mid-way on a warm machine resume from their save points; finished families still waiting for
   their dense baselines (commit $OUT/waiting.jsonl too) go back into their run folders;
3. runs the sweep budget by budget, smallest first, within --seconds (minus a margin for the copy),
   with as many runs at once as --jobs allows while one run still fits the time left;
4. writes to $OUT: runs.jsonl, waiting.jsonl (finished runs waiting for baselines), tokenizer.json,
   tokenizer_config.json, data_index.json, study.log and run_logs.tar.gz (every run's config, metrics
   and log), and prints a table per budget.
The figures and the fit come later, on any machine, from runs.jsonl (benchmarks/isoflop/figures.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from trunk.sweep import data_summary, load_sweep  # noqa: E402

HERE = Path(__file__).resolve().parent
MARGIN_S = 25.0  # left at the end for the copy to $OUT


class StudyError(RuntimeError):
    pass


def log(msg: str, logf) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    logf.write(line + "\n")
    logf.flush()


def _run(cmd: list[str], logf, timeout: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1"}
    logf.write("$ " + " ".join(cmd) + "\n")
    logf.flush()
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return 124


def prepare_corpus(args, data: Path, logf) -> dict:
    if (data / "index.json").is_file():
        log(f"corpus: reusing {data} (prepared earlier on this machine)", logf)
    else:
        cmd = [sys.executable, "-m", "trunk.cli", "prepare", "--preset", "pycorpus", "--out", str(data),
               "--no-progress", "--max-bytes", str(args.max_corpus_bytes)]
        tok = Path(args.results)
        if (tok / "tokenizer.json").is_file() and (tok / "tokenizer_config.json").is_file():
            cmd += ["--tokenizer-from", str(tok)]
            log(f"corpus: tokenizing with the committed vocabulary in {tok}", logf)
        else:
            cmd += ["--tokenizer", args.tokenizer, "--vocab-size", str(args.vocab_size)]
        t0 = time.time()
        if _run(cmd, logf) != 0:
            raise StudyError("preparing the corpus failed (see study.log)")
        log(f"corpus: prepared in {time.time() - t0:.0f} s", logf)
    index = json.loads((data / "index.json").read_text())
    s, c = index["splits"], index.get("corpus", {})
    log(f"corpus: {c.get('unique_documents')} unique files ({c.get('duplicates_dropped')} duplicates dropped, "
        f"{c.get('bytes', 0) / 1e6:.1f} MB) -> {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens, "
        f"vocab {index['vocab_size']}", logf)
    return index


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a half-written last line of a killed call
    return out


def merge_ledgers(local: Path, carried: Path, fingerprint: str, logf) -> int:
    """Union of the warm machine's runs.jsonl and the carried one, by run key; same corpus only."""
    recs = {}
    for r in _read(local) + _read(carried):
        recs.setdefault(r["sweep"]["key"], r)
    other = {r["sweep"]["data"] for r in recs.values()} - {fingerprint}
    if other:
        raise StudyError(f"runs.jsonl holds runs of another corpus (data {sorted(other)}, this machine's is "
                         f"{fingerprint}); they would not be comparable: start a new results folder")
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs.values()))
    os.replace(tmp, local)
    log(f"ledger: {len(recs)} runs already done ({len(_read(carried))} carried in)", logf)
    return len(recs)


def waiting_records(sweep: Path) -> list[dict]:
    """Finished runs not in the sweep's runs.jsonl: families whose dense baselines are not done yet keep
    their record in their run folder (trunk/sweep_runner.py). Carried out of a call (waiting.jsonl), so a
    later call on another machine puts them back instead of training them again."""
    done = {r["sweep"]["key"] for r in _read(sweep / "runs.jsonl")}
    out = []
    for d in sorted(p for p in (sweep / "runs").iterdir() if p.is_dir()):
        recs = _read(d / "runs.jsonl")
        if recs and d.name.rsplit("-", 1)[-1] not in done:
            out.append({"dir": d.name, "record": recs[-1]})
    return out


def restore_waiting(sweep: Path, carried: Path, logf) -> None:
    """Put carried waiting records back into their run folders (where the sweep collects them)."""
    n = 0
    for w in _read(carried):
        d = sweep / "runs" / w["dir"]
        if not (d / "runs.jsonl").is_file():
            d.mkdir(parents=True, exist_ok=True)
            (d / "runs.jsonl").write_text(json.dumps(w["record"]) + "\n")
            n += 1
    if n:
        log(f"ledger: {n} finished run(s) put back in their folders, waiting for their dense baselines", logf)


def aggregate_rate(records: list[dict], default: float) -> float:
    """FLOP/s of the whole device: per-run FLOP/s (wall, start-up included) times the runs sharing it."""
    rates = sorted(r["flops_total"] / r["sweep"]["wall_seconds"] * r["sweep"]["device"]["jobs"]
                   for r in records if r.get("sweep", {}).get("wall_seconds"))
    return rates[len(rates) // 2] if rates else default


def jobs_for(C: float, left_s: float, rate: float, max_jobs: int) -> int:
    """As many runs at once as still let one run (J * C / rate seconds) finish in 2/3 of the time left."""
    return max(1, min(max_jobs, int(left_s / 1.5 * rate / C)))


def summarise(records: list[dict]) -> str:
    """Per budget: mean exit loss of each shape (rows) at each G (columns), throughput, MFU, epochs."""
    lines = []
    for C in sorted({r["sweep"]["budget"] for r in records}):
        rs = [r for r in records if r["sweep"]["budget"] == C]
        grid = [r for r in rs if r["sweep"]["role"] == "grid"]
        Gs = sorted({r["G"] for r in grid})
        lines.append(f"C = {C:.0e}: {len(grid)} grid runs, {len(rs) - len(grid)} dense baselines")
        lines.append("  " + f"{'shape':>9} {'N':>10} " + " ".join(f"{'G=' + str(g):>7}" for g in Gs)
                     + f" {'tok/s':>17} {'MFU':>13} {'epochs':>6}")
        shapes = sorted({(r["config"]["model"]["d_model"], r["n_layers"]) for r in grid})
        for d, L in shapes:
            row = [r for r in grid if (r["config"]["model"]["d_model"], r["n_layers"]) == (d, L)]
            loss = {r["G"]: r["loss"] for r in row}
            tok = [r["throughput"]["tokens_per_s"] for r in row if r["throughput"].get("tokens_per_s")]
            mfu = [r["throughput"]["mfu"] for r in row if r["throughput"].get("mfu") is not None]
            lines.append("  " + f"{f'd{d}-L{L}':>9} {min(r['N'] for r in row):>10,} "
                         + " ".join(f"{loss[g]:>7.4f}" if g in loss else f"{'-':>7}" for g in Gs)
                         + f" {(f'{min(tok):.3g}-{max(tok):.3g}' if tok else '-'):>17}"
                         + f" {(f'{min(mfu):.1%}-{max(mfu):.1%}' if mfu else '-'):>13}"
                         + f" {max(r['sweep']['epochs'] for r in row):>6.2f}")
    return "\n".join(lines)


def copy_out(out: Path, work: Path, data: Path, logf) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sweep = work / "sweep"
    if (sweep / "runs.jsonl").is_file():
        shutil.copy(sweep / "runs.jsonl", out / "runs.jsonl")
    if (sweep / "runs").is_dir():
        (out / "waiting.jsonl").write_text("".join(json.dumps(w) + "\n" for w in waiting_records(sweep)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (data / name).is_file():
            shutil.copy(data / name, out / name)
    if (data / "index.json").is_file():
        shutil.copy(data / "index.json", out / "data_index.json")
    runs = sweep / "runs"
    if runs.is_dir():
        with tarfile.open(out / "run_logs.tar.gz", "w:gz") as tar:
            for d in sorted(runs.iterdir()):
                for name in ("config.json", "metrics.jsonl", "train.log", "family.json"):
                    if (d / name).is_file():
                        tar.add(d / name, arcname=f"{d.name}/{name}")
    logf.flush()


def run_study(args) -> int:
    t0 = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data, sweep_dir = work / "data", work / "sweep"
    logf = open(out / "study.log", "a")
    try:
        return _study(args, t0, out, work, data, sweep_dir, logf)
    except StudyError as e:
        log(f"stopped: {e}", logf)
        return 1
    finally:
        copy_out(out, work, data, logf)
        logf.close()


def _study(args, t0, out, work, data, sweep_dir, logf) -> int:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    log(f"device {dev}, torch {torch.__version__}, python {sys.version.split()[0]}; budget {args.seconds:.0f} s", logf)
    prepare_corpus(args, data, logf)
    fp = data_summary(str(data))["fingerprint"]
    merge_ledgers(sweep_dir / "runs.jsonl", Path(args.results) / "runs.jsonl", fp, logf)
    restore_waiting(sweep_dir, Path(args.results) / "waiting.jsonl", logf)
    cfg = load_sweep(args.sweep)
    budgets = sorted(cfg.budgets)
    default = 1e14 if torch.cuda.is_available() else 5e9
    for C in budgets:
        left = args.seconds - (time.time() - t0) - MARGIN_S
        if left < 30:
            log(f"time is up before C={C:.0e}", logf)
            break
        rate = aggregate_rate(_read(sweep_dir / "runs.jsonl"), default)
        jobs = jobs_for(C, left, rate, args.jobs)
        log(f"C={C:.0e}: {jobs} run(s) at once (device ~{rate:.3g} FLOP/s), {left:.0f} s left", logf)
        cmd = [sys.executable, "-m", "trunk.cli", "sweep", args.sweep, "--out", str(sweep_dir), "--data", str(data),
               "--budgets", repr(C), "--jobs", str(jobs), "--time-limit", f"{left:.0f}", "--no-progress",
               "--compile" if C >= args.compile_from else "--no-compile",
               "--cuda-graph" if args.cuda_graph and torch.cuda.is_available() else "--no-cuda-graph",
               "--compile-blocks" if args.compile_blocks else "--no-compile-blocks"]
        rc = _run(cmd, logf, timeout=left + 60)
        log(f"C={C:.0e}: sweep exited {rc}", logf)
    records = _read(sweep_dir / "runs.jsonl")
    table = summarise(records)
    logf.write(table + "\n")
    print(table)
    planned = _planned(args, sweep_dir, data)
    log(f"{len(records)} of {planned} planned runs recorded; this call took {time.time() - t0:.0f} s", logf)
    return 0


def _planned(args, sweep_dir, data) -> int:
    from trunk.sweep import plan_sweep

    cfg = load_sweep(args.sweep)
    cfg.out, cfg.data = str(sweep_dir), str(data)
    return len(plan_sweep(cfg).runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/isoflop_out"), help="results folder ($OUT)")
    p.add_argument("--sweep", default=str(HERE / "study.yaml"), help="sweep file")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "isoflop"),
                   help="committed results of earlier calls: runs.jsonl, tokenizer.json, tokenizer_config.json")
    p.add_argument("--work", default=str(REPO / ".isoflop"), help="corpus and run folders (kept on a warm machine)")
    p.add_argument("--seconds", type=float, default=540.0, help="wall-clock budget of this call")
    p.add_argument("--jobs", type=int, default=6, help="most runs at once on the GPU")
    p.add_argument("--compile-from", type=float, default=math.inf, metavar="C",
                   help="torch.compile the runs of budgets >= C (default: never; compilation costs ~tens of "
                        "seconds per run, worth it only for runs much longer than that)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="replay each run's whole optimizer step as one CUDA graph (`familial-train sweep "
                        "--cuda-graph`; ignored without CUDA)")
    p.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each run's decoder blocks (`familial-train sweep --compile-blocks`)")
    p.add_argument("--tokenizer", default="bpe", help="tokenizer when none is committed yet")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when none is committed yet")
    p.add_argument("--max-corpus-bytes", type=int, default=0, help="cap the corpus (0 = all of it)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check: benchmarks/isoflop/smoke.yaml, a 2 MB corpus, 2 jobs, 120 s")
    args = p.parse_args(argv)
    if args.smoke:
        args.sweep = str(HERE / "smoke.yaml")
        args.max_corpus_bytes = args.max_corpus_bytes or 2_000_000
        args.vocab_size, args.jobs = 512, 2
        args.seconds = min(args.seconds, 150.0)
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
