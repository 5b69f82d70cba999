"""A 6-run tiny sweep end to end on CPU: two runs at once in subprocesses, the sweep killed (SIGKILL) mid-way,
then resumed in-process: every run recorded once, finished runs kept, a killed run resumed from its save
point, families' exit_dense_loss filled from their baselines so the branch law reads the file as is."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fitting.data import branch_runs, family_runs
from trunk.checkpoint import read_meta
from trunk.cli import main
from trunk.data import prepare

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepdata")
    src = root / "src"
    src.mkdir()
    for i in range(16):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60)))
    prepare([str(src)], root / "data", tokenizer="byte", val_fraction=0.2, progress=False)
    return root / "data"


def _sweep_file(tmp_path, data_dir) -> Path:
    doc = {"out": str(tmp_path / "sweep"), "data": str(data_dir), "budgets": [2.5e10], "sizes": [1.5e4, 5e4],
           "G": [1, 2], "dense_baselines": "same_compute",
           "shape": {"head_dim": 16, "width_multiple": 16, "aspect_ratio": 16, "aspect_tolerance": 1.5,
                     "min_layers": 2},
           "train": {"seq_len": 32, "target_steps": 60, "min_batch": 4, "max_batch": 8, "micro_batch": 8,
                     "eval_sequences": 16, "save_points": 6, "threads": 1},
           "estimate": {"flops_per_s": 2e9, "overhead_s": 3}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _records(out: Path) -> list[dict]:
    p = out / "runs.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def _alive(marker: str) -> list[int]:
    """Pids of processes whose command line mentions `marker` (our sweep's run configs)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _partial_runs(out: Path) -> dict:
    """Run folder -> saved step, for runs with a trainer state but no run record yet."""
    got = {}
    for d in (out / "runs").glob("*"):
        if (d / "trainer_state.pt").is_file() and not (d / "runs.jsonl").is_file():
            got[d.name] = read_meta(d)["step"]
    return got


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to watch the child processes")
def test_tiny_sweep_killed_and_resumed(tmp_path, data_dir, capsys):
    sweep = _sweep_file(tmp_path, data_dir)
    out = tmp_path / "sweep"
    assert main(["sweep", str(sweep), "--dry-run"]) == 0
    assert "to run: 6 runs" in capsys.readouterr().out

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trunk.cli", "sweep", str(sweep), "--jobs", "2", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once two runs are recorded and another sits at a save point
        if proc.poll() is not None:
            pytest.fail("the sweep finished before it could be killed:\n" + proc.stdout.read().decode()[-2000:])
        if len(_records(out)) >= 2 and _partial_runs(out):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no partial run within the time allowed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    for _ in range(200):  # its runs die with it (PR_SET_PDEATHSIG), none is left writing
        if not _alive(str(out)):
            break
        time.sleep(0.05)
    assert not _alive(str(out)), "run processes outlived the killed sweep"

    before = _records(out)
    partial = _partial_runs(out)
    assert 2 <= len(before) < 6 and partial
    first_lines = (out / "runs.jsonl").read_text()

    assert main(["sweep", str(sweep), "--no-progress"]) == 0  # resume, in this process
    text = capsys.readouterr().out
    assert f"{len(before)} done, {6 - len(before)} to run" in text
    after = _records(out)
    assert len(after) == 6 and len({r["sweep"]["key"] for r in after}) == 6
    assert (out / "runs.jsonl").read_text().startswith(first_lines)  # finished runs kept, not re-run
    by_dir = {f"{r['sweep']['name']}-{r['sweep']['key']}": r for r in after}
    for name, step in partial.items():  # resumed from its save point: this process trained only the rest
        rec = by_dir[name]
        assert rec["throughput"]["timed_steps"] == rec["steps"] - step - 1, name

    fams = [r for r in after if r["G"] == 2]
    dense = {r["sweep"]["name"]: r for r in after if r["G"] == 1}
    assert len(fams) == 2 and len(dense) == 4
    for f in fams:
        assert f["exit_dense"]["definition"] == "same_compute"
        assert f["exit_dense_loss"] == [dense[n]["exit_val_loss"][0] for n in f["exit_dense"]["runs"]]
        assert all(dense[n]["flops_total"] == pytest.approx(f["flops_total"], rel=0.2) for n in f["exit_dense"]["runs"])
    for r in after:
        assert r["throughput"]["tokens_per_s"] > 0 and r["sweep"]["device"]["name"].startswith("cpu")
    rows = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert branch_runs(rows).n == 4  # two exits of two families, L_dense from the records themselves
    assert family_runs(rows).n == 6

    assert main(["sweep", str(sweep), "--no-progress"]) == 0  # a third call has nothing to do
    assert "6 done, 0 to run" in capsys.readouterr().out and len(_records(out)) == 6


def _small(tmp_path, data_dir, budget, estimate, name="small.yaml", sizes=(5e4,)) -> Path:
    doc = yaml.safe_load(_sweep_file(tmp_path, data_dir).read_text())
    doc.update(budgets=[budget], sizes=list(sizes), G=[1], dense_baselines="off", estimate=estimate)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_time_limit_defers_runs_that_do_not_fit(tmp_path, data_dir, capsys):
    sweep = _small(tmp_path, data_dir, 1e11, {"flops_per_s": 1e3, "overhead_s": 0})
    assert main(["sweep", str(sweep), "--time-limit", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) left for a later call (time limit)" in out and "0 record(s) written" in out
    assert not _records(tmp_path / "sweep")


def test_time_limit_stops_running_runs(tmp_path, data_dir, capsys):
    sweep = _small(tmp_path, data_dir, 3e11, {"flops_per_s": 1e15, "overhead_s": 0}, sizes=(2e4, 5e4))
    t0 = time.time()
    assert main(["sweep", str(sweep), "--time-limit", "6", "--jobs", "2", "--no-progress"]) == 0
    assert time.time() - t0 < 40
    out = capsys.readouterr().out
    assert "2 run(s) stopped at the time limit (resume next call)" in out
    assert not _records(tmp_path / "sweep") and not _alive(str(tmp_path / "sweep"))


@pytest.mark.slow
def test_torchrun_runs(tmp_path, data_dir, capsys):
    sweep = _small(tmp_path, data_dir, 1e10, {}, sizes=(1.5e4,))
    assert main(["sweep", str(sweep), "--nproc-per-run", "2", "--no-progress"]) == 0
    (rec,) = _records(tmp_path / "sweep")
    assert rec["world_size"] == 2 and rec["sweep"]["device"]["nproc_per_run"] == 2
    assert rec["global_batch"] == rec["config"]["train"]["batch_size"] * rec["config"]["train"]["grad_accum"] * 2


def test_estimator_prefers_runs_of_the_same_budget():
    from types import SimpleNamespace

    from trunk.sweep_runner import Estimator

    def rec(N, budget, rate):
        return {"N": N, "flops_total": rate * 10.0, "sweep": {"wall_seconds": 10.0, "budget": budget}}

    done = {"a": rec(2e5, 1e15, 2e12), "b": rec(9e5, 3e15, 1.2e13)}
    est = Estimator(done, default_rate=1e12, overhead_s=5.0)
    spec = SimpleNamespace(N=2e5, budget=3e15, flops=3e15)
    assert est.seconds(spec) == pytest.approx(3e15 / 1.2e13)            # the 3e15 run, though farther in N
    spec_other = SimpleNamespace(N=2e5, budget=5e14, flops=5e14)
    assert est.seconds(spec_other) == pytest.approx(5e14 / 2e12)          # none at 5e14: the nearest N
    est.add(rec(2.1e5, 3e15, 6e12))
    assert est.seconds(spec) == pytest.approx(3e15 / 6e12)
    assert Estimator({}, 1e12, 5.0).seconds(spec) == pytest.approx(5.0 + 3e15 / 1e12)
