"""The IsoFLOP study's scripts: figures from runs.jsonl + fit.json, the study's resume and pacing helpers,
and (slow) the whole study in its CPU smoke mode, twice, the second call carrying on from the first's $OUT."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fitting.laws import PAPER, PAPER_BRANCH, branch_loss, family_law_loss
from tests.figure_capture import line_data, marker_points, saved_figures, scatter_points, visible_axes
from trunk.sweep import load_sweep, plan_sweep

REPO = Path(__file__).resolve().parents[2]
ISO = REPO / "benchmarks" / "isoflop"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"iso_{name}", ISO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_runs(path: Path) -> list[dict]:
    """Records shaped like the sweep's, for the study's own plan, with losses drawn from known laws."""
    cfg = load_sweep(str(ISO / "study.yaml"))
    plan = plan_sweep(cfg, data={"fingerprint": "synthetic", "train_tokens": 6e7, "val_tokens": 3e6,
                                 "vocab_size": 4096})
    rng = np.random.default_rng(0)
    recs = []
    for s in plan.runs:
        L, exits = s.model["n_layers"], s.model["exit_layers"] + [s.model["n_layers"]]
        dense = [float(family_law_loss(s.N * l / L, s.tokens, 1, PAPER)) for l in exits]
        G = len(exits)
        losses = [float(branch_loss(g, G - 1 - g, s.tokens, dense[g], PAPER_BRANCH)) * (1 + 0.002 * rng.standard_normal())
                  for g in range(G)]
        recs.append({"N": s.N, "D": s.tokens, "G": G, "n_layers": L, "exit_layers": s.model["exit_layers"],
                     "flops_per_token": s.flops_per_token, "flops_total": s.flops, "exit_val_loss": losses,
                     "loss": float(np.mean(losses)), "config": {"model": s.model, "train": s.train},
                     "throughput": {"tokens_per_s": 1e6, "mfu": 0.1},
                     "sweep": {"key": s.key, "name": s.name, "role": s.role, "budget": s.budget, "epochs": s.epochs,
                               "data": "synthetic", "wall_seconds": 30.0, "device": {"jobs": 6}}})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_figures_from_runs_and_a_fit(tmp_path, capsys):
    fig = _load("figures")
    recs = _synthetic_runs(tmp_path / "runs.jsonl")
    (tmp_path / "fit.json").write_text(json.dumps({"law": "family", "params": PAPER.as_dict()}))
    with saved_figures() as figs:
        assert fig.main([str(tmp_path / "runs.jsonl"), "--fit", str(tmp_path / "fit.json"),
                         "--out", str(tmp_path / "f")]) == 0
    assert set(figs) == {"isoflop_curves.png", "loss_vs_G.png", "efficiency_leverage.png"}
    for name in figs:
        assert (tmp_path / "f" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    grid = [r for r in recs if r["sweep"]["role"] == "grid"]
    Gs, budgets = sorted({r["G"] for r in grid}), sorted({r["sweep"]["budget"] for r in recs})
    lo, hi = min(r["loss"] for r in recs), max(r["loss"] for r in recs)

    # IsoFLOP curves: one panel per G; every run of that G is a point; law curves lie near the runs
    panels = visible_axes(figs["isoflop_curves.png"])
    assert [ax.get_title() for ax in panels] == [f"G = {G}" for G in Gs]
    for ax, G in zip(panels, Gs):
        assert ax.get_xlabel() == "N (non-embedding parameters)" and ax.get_xscale() == "log"
        assert scatter_points(ax) == {(round(r["N"], 9), round(r["loss"], 9)) for r in recs if r["G"] == G}
        curves = line_data(ax)
        assert len(curves) == len({r["sweep"]["budget"] for r in recs if r["G"] == G})
        for xy in curves:
            assert np.isfinite(xy).all() and PAPER.E < xy[:, 1].min() and xy[:, 1].max() < hi * 1.2
    assert panels[0].get_ylabel() == "validation loss (mean over exits)"

    # loss vs G: one panel per budget; the grid runs' (G, loss) as markers
    panels = visible_axes(figs["loss_vs_G.png"])
    assert [ax.get_title() for ax in panels] == [f"C = {C:.0e} FLOPs" for C in budgets]
    for ax, C in zip(panels, budgets):
        assert ax.get_xlabel() == "G (exits)" and list(ax.get_xticks()) == Gs
        assert marker_points(ax) == {(r["G"], round(r["loss"], 9)) for r in grid if r["sweep"]["budget"] == C}
        for xy in line_data(ax):
            assert lo * 0.8 < xy[:, 1].min() and xy[:, 1].max() < hi * 1.2

    # EL: a fitted and a paper curve per G > 1; the fit here is the paper's law, so each pair coincides
    (ax,) = visible_axes(figs["efficiency_leverage.png"])
    assert ax.get_ylabel() == "EL = L_dense-set / L_family" and ax.get_xscale() == "log"
    labels = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert labels == [f"G={G}, {kind}" for G in Gs if G > 1 for kind in ("fitted", "paper")]
    fitted, paper = line_data(ax)[0::2], line_data(ax)[1::2]
    for f, pp in zip(fitted, paper):
        np.testing.assert_allclose(f, pp)
        assert f[0, 0] == pytest.approx(1e14) and f[-1, 0] == pytest.approx(1e24) and (f[:, 1] > 0).all()
    # the interpolated FLOP count reproduces the runs' own
    runs = fig.read_runs(tmp_path / "runs.jsonl")
    f = fig.fpt_curve(runs, 4)
    for r in (r for r in runs if r["G"] == 4):
        assert f(r["N"]) == pytest.approx(r["flops_per_token"], rel=0.1)  # shapes vary in aspect ratio


def test_figures_bad_input_is_one_line(tmp_path, capsys):
    fig = _load("figures")
    (tmp_path / "runs.jsonl").write_text('{"N": 1}\n')
    (tmp_path / "fit.json").write_text(json.dumps({"law": "branch", "params": {"alpha_P": 1}}))
    for argv, needle in (([str(tmp_path / "runs.jsonl"), "--fit", str(tmp_path / "fit.json")], "not a sweep run record"),
                         ([str(tmp_path / "none.jsonl"), "--fit", str(tmp_path / "fit.json")], "No such file")):
        assert fig.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    _synthetic_runs(tmp_path / "runs.jsonl")
    assert fig.main([str(tmp_path / "runs.jsonl"), "--fit", str(tmp_path / "fit.json")]) == 2
    assert "not a familial-fit --json result of the family" in capsys.readouterr().err


def test_study_paces_and_merges(tmp_path):
    study = _load("study")
    recs = [{"flops_total": 1e15, "sweep": {"wall_seconds": 60.0, "device": {"jobs": 6}, "key": "a", "data": "x"}},
            {"flops_total": 1e15, "sweep": {"wall_seconds": 30.0, "device": {"jobs": 2}, "key": "b", "data": "x"}}]
    assert study.aggregate_rate(recs, 1.0) == pytest.approx(1e15 / 60 * 6)
    assert study.aggregate_rate([], 7.0) == 7.0
    assert study.jobs_for(1e15, 300, 1e14, 6) == 6      # 6 runs at once: one takes 60 s
    assert study.jobs_for(1e16, 450, 1e14, 6) == 3      # one run must finish in 2/3 of what is left
    assert study.jobs_for(1e17, 100, 1e14, 6) == 1
    local, carried = tmp_path / "w" / "runs.jsonl", tmp_path / "r" / "runs.jsonl"
    carried.parent.mkdir()
    carried.write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n")
    local.parent.mkdir()
    local.write_text(json.dumps(recs[1]) + "\n" + '{"half": ')  # a warm machine's file, cut mid-line
    with open(tmp_path / "log", "w") as logf:
        assert study.merge_ledgers(local, carried, "x", logf) == 2
        assert sorted(json.loads(l)["sweep"]["key"] for l in local.read_text().splitlines()) == ["a", "b"]
        with pytest.raises(study.StudyError, match="another corpus"):
            study.merge_ledgers(local, carried, "y", logf)


def test_study_carries_families_waiting_for_baselines(tmp_path):
    """A family finished before its dense baselines keeps its record in its run folder; the study carries
    it out (waiting.jsonl) and a call on a fresh machine puts it back, so it is collected, not re-trained."""
    study = _load("study")
    sweep = tmp_path / "w1" / "sweep"
    (sweep / "runs" / "3e15-d96-L4-G2-x2-s0-0123456789").mkdir(parents=True)
    (sweep / "runs" / "3e15-d96-L4-G1-s0-abcdefabcd").mkdir()
    (sweep / "runs" / "3e15-d96-L2-G1-s0-5555555555").mkdir()  # stopped mid-way: no record
    fam = {"N": 1, "G": 2, "exit_val_loss": [2.5, 2.4], "steps": 10}
    (sweep / "runs" / "3e15-d96-L4-G2-x2-s0-0123456789" / "runs.jsonl").write_text(json.dumps(fam) + "\n")
    (sweep / "runs" / "3e15-d96-L4-G1-s0-abcdefabcd" / "runs.jsonl").write_text('{"G": 1}\n')
    (sweep / "runs.jsonl").write_text(json.dumps({"sweep": {"key": "abcdefabcd"}}) + "\n")  # in the ledger
    assert study.waiting_records(sweep) == [{"dir": "3e15-d96-L4-G2-x2-s0-0123456789", "record": fam}]
    with open(tmp_path / "log", "w") as logf:
        study.copy_out(tmp_path / "out", tmp_path / "w1", tmp_path / "w1" / "data", logf)
        fresh = tmp_path / "w2" / "sweep"
        study.restore_waiting(fresh, tmp_path / "out" / "waiting.jsonl", logf)
    back = fresh / "runs" / "3e15-d96-L4-G2-x2-s0-0123456789" / "runs.jsonl"
    assert json.loads(back.read_text()) == fam
    assert sorted(p.name for p in (fresh / "runs").iterdir()) == ["3e15-d96-L4-G2-x2-s0-0123456789"]
    assert "1 finished run(s) put back" in (tmp_path / "log").read_text()


@pytest.mark.slow
def test_study_smoke_twice(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, str(ISO / "study.py"), "--smoke", "--max-corpus-bytes", "600000"]
    first = subprocess.run(base + ["--out", str(tmp_path / "o1"), "--work", str(tmp_path / "w1"),
                                   "--results", str(tmp_path / "none")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    got = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert got == ["data_index.json", "run_logs.tar.gz", "runs.jsonl", "study.log", "tokenizer.json",
                   "tokenizer_config.json", "waiting.jsonl"]
    assert (tmp_path / "o1" / "waiting.jsonl").read_text() == ""  # every family's baselines ran
    n1 = len((tmp_path / "o1" / "runs.jsonl").read_text().splitlines())
    assert n1 == 10 and "10 of 10 planned runs recorded" in first.stdout
    # a fresh machine: corpus rebuilt with the carried tokenizer, same fingerprint, nothing re-run
    second = subprocess.run(base + ["--out", str(tmp_path / "o2"), "--work", str(tmp_path / "w2"),
                                    "--results", str(tmp_path / "o1")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "10 runs already done (10 carried in)" in second.stdout
    assert (tmp_path / "o2" / "runs.jsonl").read_text() == (tmp_path / "o1" / "runs.jsonl").read_text()


def test_paper_ours_table(tmp_path, capsys):
    from fitting.leverage import efficiency_leverage

    tab = _load("table")
    recs = _synthetic_runs(tmp_path / "runs.jsonl")
    ours = PAPER.replace(gamma=0.1, alpha=0.35)
    fit = {"law": "family", "params": ours.as_dict(), "n_runs": len(recs),
           "ci": {"gamma": [0.05, 0.15], "N_opt_exponent": [0.4, 0.6]}}
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    (tmp_path / "branch.json").write_text(json.dumps({"law": "branch", "n_runs": 7, "params": {
        "alpha_P": 0.002, "beta_Q": 0.03, "D_d": 2.75e6, "a": 0.5}}))
    assert tab.main([str(tmp_path / "runs.jsonl"), "--fit", str(tmp_path / "fit.json"),
                     "--branch", str(tmp_path / "branch.json")]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")}
    assert rows["gamma (small, positive), 95 % CI"] == ["0.0333", "0.1 [0.05, 0.15] |"]
    assert rows["N_opt exponent beta / (alpha + beta)"][1] == f"{ours.beta / (ours.alpha + ours.beta):.4g} [0.4, 0.6] |"
    assert rows["branch law: upstream exits cheap (alpha_P << beta_Q)"] == [
        "alpha_P 0.001, beta_Q 0.0397", "alpha_P 0.002, beta_Q 0.03 |"]
    # EL cells: the fitted law's values under each reading, at the smallest and largest budget and 1e21
    budgets = sorted({r["sweep"]["budget"] for r in recs})
    el_row = next(v for k, v in rows.items() if k.startswith("EL > 1"))
    for side in ("matched", "same-tokens", "budget-split"):
        want = ", ".join(f"{float(efficiency_leverage(C, 4, ours, side)):.4g}" for C in (budgets[0], budgets[-1], 1e21))
        assert f"G=4: {want}" in el_row[1].split(f"*{side}*")[1].split("<br>")[0]
    # the runs' own verdict: the synthetic losses (branch law on top of the dense law) rise with G at every size
    n_sizes = {C: len({(r["config"]["model"]["d_model"], r["n_layers"]) for r in recs
                       if r["sweep"]["budget"] == C and r["sweep"]["role"] == "grid"}) for C in budgets}
    assert rows["mean exit loss rises with G (runs, no law: sizes per budget)"][1] == \
        "; ".join(f"{C:.0e}: {n} of {n}" for C, n in n_sizes.items()) + " |"
    assert f"{len(recs)} runs, {len(recs)} in the family fit, 7 in the branch fit." in out

    # a branch fit passed as the family fit (or nonsense) is one line and status 2
    assert tab.main([str(tmp_path / "runs.jsonl"), "--fit", str(tmp_path / "branch.json")]) == 2
    assert tab.main([str(tmp_path / "runs.jsonl"), "--fit", str(tmp_path / "fit.json"),
                     "--branch", str(tmp_path / "fit.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("table.py: error: ") for e in err), err
