"""familial-fit end to end: CSV and JSONL run records, every law, --json schema, plots, paper figures,
--help coverage and one-line errors with exit status 2."""
import json

import numpy as np
import pytest

from fitting.cli import _fit_parser, _plan_parser, fit_main, plan_main
from fitting.fitter import FitConfig
from fitting.laws import PAPER, PAPER_BRANCH
from fitting.synthetic import branch_sweep, isoflop_sweep


@pytest.fixture(scope="module")
def csv_runs(tmp_path_factory):
    r = isoflop_sweep(noise=0.005, seed=2)
    path = tmp_path_factory.mktemp("runs") / "runs.csv"
    rows = ["N,D,G,loss"] + [f"{n:.17g},{d:.17g},{int(g)},{l:.17g}" for n, d, g, l in zip(r.N, r.D, r.G, r.loss)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def jsonl_runs(tmp_path_factory):
    """Run records as the trainer writes them; per-exit losses from the branch law on the dense law."""
    r = isoflop_sweep(noise=0.0)
    path = tmp_path_factory.mktemp("runs") / "runs.jsonl"
    lines = []
    for n, d, g, loss, c in zip(r.N, r.D, r.G, r.loss, r.C):
        G, L = int(g), 24
        exits = [round(L * k / G) for k in range(1, G)]
        lines.append(json.dumps({"N": float(n), "N_total": float(n) * 1.2, "D": float(d), "G": G, "exit_layers": exits, "n_layers": L,
                                 "flops_per_token": float(c / d), "flops_total": float(c), "loss": float(loss),
                                 "exit_val_loss": [float(loss)] * G, "config": {}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(argv, capsys):
    code = fit_main(argv)
    return code, capsys.readouterr()


def test_family_fit_from_csv_writes_the_documented_json(csv_runs, tmp_path, capsys):
    out = tmp_path / "fit.json"
    code, _ = _run([str(csv_runs), "--grid", "hoffmann", "--bootstrap", "8", "--json", str(out), "--no-progress"],
                   capsys)
    assert code == 0
    doc = json.loads(out.read_text())
    assert {"law", "params", "objective", "n_runs", "ci", "validation"} <= set(doc)
    assert list(doc["params"]) == ["E", "A", "alpha", "B", "beta", "gamma"]
    assert doc["n_runs"] == 258 and doc["law"] == "family"
    assert doc["params"]["gamma"] == pytest.approx(PAPER.gamma, rel=0.05)
    assert set(doc["ci"]) >= {"E", "A", "alpha", "B", "beta", "gamma", "N_opt_exponent", "N_opt@1e+20"}
    assert doc["validation"]["largest_budget_mean_abs_rel_err"] < 0.01


def test_dense_fit_from_jsonl_uses_only_g1_records(jsonl_runs, tmp_path, capsys):
    out = tmp_path / "dense.json"
    code, io = _run([str(jsonl_runs), "--law", "dense", "--grid", "hoffmann", "--json", str(out),
                     "--no-progress"], capsys)
    doc = json.loads(out.read_text())
    assert code == 0 and doc["n_runs"] == 43
    assert list(doc["params"]) == ["E", "A", "alpha", "B", "beta"]
    assert doc["params"]["alpha"] == pytest.approx(PAPER.alpha, rel=1e-3)


def test_branch_fit_from_csv_and_from_run_records(tmp_path, jsonl_runs, capsys):
    b = branch_sweep(noise=0.0)
    path = tmp_path / "branch.csv"
    rows = ["P,Q,D,loss,L_dense"] + [f"{p:.17g},{q:.17g},{d:.17g},{l:.17g},{ld:.17g}"
                                     for p, q, d, l, ld in zip(b.P, b.Q, b.D, b.loss, b.L_dense)]
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "branch.json"
    code, _ = _run([str(path), "--law", "branch", "--json", str(out), "--plots", str(tmp_path / "p"),
                    "--no-progress"], capsys)
    doc = json.loads(out.read_text())
    assert code == 0 and list(doc["params"]) == ["alpha_P", "beta_Q", "D_d", "a"]
    assert doc["fixed"] == {"D_d": PAPER_BRANCH.D_d, "D_unit": 1e3} and doc["params"]["D_d"] == PAPER_BRANCH.D_d
    for k, v in PAPER_BRANCH.as_dict().items():
        assert doc["params"][k] == pytest.approx(v, rel=1e-3)
    # D_d held at another value: alpha_P, beta_Q rescale by (D_d / D_d')^a, a and the fit do not change
    code, _ = _run([str(path), "--law", "branch", "--branch-Dd", "1e8", "--keep", "64", "--json", str(out),
                    "--no-progress"], capsys)
    doc = json.loads(out.read_text())
    scale = (PAPER_BRANCH.D_d / 1e8) ** PAPER_BRANCH.a
    assert code == 0 and doc["fixed"] == {"D_d": 1e8, "D_unit": 1e3} and doc["params"]["D_d"] == 1e8
    assert doc["params"]["a"] == pytest.approx(PAPER_BRANCH.a, rel=1e-3)
    assert doc["params"]["beta_Q"] == pytest.approx(PAPER_BRANCH.beta_Q * scale, rel=1e-3)
    assert (tmp_path / "p" / "branch_law.png").stat().st_size > 0
    # run records: exits expanded, L_dense from a dense fit to the G == 1 records
    code, io = _run([str(jsonl_runs), "--law", "branch", "--grid", "hoffmann", "--no-progress"], capsys)
    assert code == 0 and "L_dense from a dense-law fit to 43 G == 1 runs" in io.out


def test_fit_plots_render(csv_runs, tmp_path, capsys):
    code, _ = _run([str(csv_runs), "--grid", "hoffmann", "--plots", str(tmp_path / "fit"), "--no-progress"], capsys)
    assert code == 0
    for name in ("residuals_family", "fig1_loss_surfaces", "fig2_isoloss_frontier", "fig3_6_loss_vs_G"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "fit" / f"{name}.{ext}").stat().st_size > 1000


@pytest.mark.slow
def test_paper_figures_from_a_given_profile(tmp_path):
    from fitting.figures import paper_figures
    from fitting.identifiability import paper_design_runs, profile_ab
    prof = profile_ab(paper_design_runs(noise=0.01), np.arange(3.0, 9.01, 1.5), np.arange(7.5, 8.51, 0.25),
                      FitConfig(grid="hoffmann"))
    paths = paper_figures(tmp_path, profile=prof)
    names = {p.stem for p in paths}
    assert names == {"fig1_loss_surfaces", "fig2_isoloss_frontier", "fig3_6_loss_vs_G", "branch_law",
                     "fig7_efficiency_leverage", "identifiability"}
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.slow
def test_paper_figures_from_the_cli_need_no_runs(tmp_path, capsys):
    code, io = _run(["--paper-figures", str(tmp_path / "alone")], capsys)   # no RUNS needed
    assert code == 0 and "wrote 12 files" in io.out
    assert (tmp_path / "alone" / "identifiability.png").exists()


@pytest.mark.parametrize("content, fragment", [
    ("", "is empty"),
    ("N,D,G\n1e8,1e10,1\n", "no 'loss' field"),
    ("N,D,G,loss\n1e8,abc,1,3.0\n", "non-numeric value"),
    ("N,D,G,loss\n1e8,1e10,1,-3.0\n", "every loss must be a positive number"),
    ('{"N": 1e8, "D": 1e10, "G": 1, "loss": 3.0}\n{oops\n', "not a JSON object"),
    ("N,D,G,loss\n1e8,1e10,1,3.0\n2e8,1e10,1,2.9\n", "2 run(s) cannot determine 6 free parameters"),
    ('{"schema": "familial.run/v2", "N": 1e8, "D": 1e10, "G": 1, "loss": 3.0}\n', "schema 'familial.run/v2'"),
    ('{"N": 1e8, "D": "many", "G": 1, "loss": 3.0}\n', "D must be a number"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    code = fit_main([str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert err.startswith("familial-fit: error: "), err


def test_plan_usage_and_input_errors_are_one_line(tmp_path, capsys):
    for argv, fragment in ((["--flops", "1e20"], "--tiers"), (["--flops", "x", "--tiers", "t.yaml"], "invalid float"),
                           (["--flops", "-1", "--tiers", str(tmp_path / "none.yaml")], "")):
        assert plan_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("familial-plan: error: ") and fragment in err, err


def test_missing_file_and_missing_runs_are_clear(capsys, tmp_path):
    for argv, fragment in (([str(tmp_path / "nope.csv")], "cannot read"), ([], "RUNS is required")):
        code = fit_main(argv)
        assert code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("make", [_fit_parser, _plan_parser])
def test_help_documents_every_flag(make):
    p = make()
    for a in p._actions:
        assert a.help, f"{a.option_strings or a.dest} has no help"
    text = p.format_help()
    for a in p._actions:
        for s in a.option_strings:
            assert s in text


# ---- the trainer's own records, small and bad sweeps --------------------------------------------
def _trainer_records(path, noise=0.005, seed=0, widths=(64, 96, 128, 192), Gs=(1, 2, 3), budgets=(2e12, 6e12, 2e13)):
    """An IsoFLOP sweep written by trunk.train.run_record exactly as familial-train appends it (one
    json.dumps per line); the validation losses come from the paper's law with log-normal noise."""
    from trunk.config import get_preset
    from trunk.train import TrainConfig, make_plan, run_record
    from fitting.laws import family_law_loss
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for C in budgets:
            for d in widths:
                for G in Gs:
                    mcfg = get_preset("tiny").replace(d_model=d, n_heads=d // 32, n_kv_heads=d // 64, d_ff=3 * d,
                                                      n_layers=4, exit_layers=tuple(range(1, G)))
                    t = TrainConfig(seq_len=64, batch_size=4, steps=1)
                    fpt = make_plan(mcfg, t, 1).flops_per_token
                    t = TrainConfig(seq_len=64, batch_size=4, steps=max(1, round(C / fpt / 256)))
                    plan = make_plan(mcfg, t, 1)
                    rec = run_record(mcfg, t, plan, plan.steps, [0.0] * G, 1.0, 1)
                    L = float(family_law_loss(rec["N"], rec["D"], G) * np.exp(noise * rng.standard_normal()))
                    rec["exit_val_loss"] = [L * (1 + 0.02 * (G - 1 - g)) for g in range(G)]
                    rec["loss"] = float(np.mean(rec["exit_val_loss"]))
                    f.write(json.dumps(rec) + "\n")
    return path


def _strict_load(path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(path.read_text(), parse_constant=bad)


def test_fits_the_trainers_runs_jsonl_as_written_with_either_n(tmp_path, capsys):
    runs = _trainer_records(tmp_path / "runs.jsonl")
    out = tmp_path / "fit.json"
    code, io = _run([str(runs), "--grid", "hoffmann", "--json", str(out), "--no-progress"], capsys)
    doc = _strict_load(out)
    assert code == 0 and doc["n_runs"] == 36 and doc["n_kind"] == "non-embedding", io.err
    assert doc["params"]["gamma"] == pytest.approx(0.0333 + np.log(np.mean([1.04, 1.02, 1.0])) / np.log(3), abs=0.02)
    from fitting import data
    rows = data.read_rows(runs)
    total = data.family_runs(rows, n_kind="total")
    np.testing.assert_array_equal(total.N, [r["N_total"] for r in rows])
    assert np.all(total.N > data.family_runs(rows).N)
    code, io = _run([str(runs), "--grid", "hoffmann", "--n", "total", "--json", str(out), "--no-progress"], capsys)
    doc2 = _strict_load(out)
    assert code == 0 and doc2["n_kind"] == "total" and doc2["params"]["A"] != doc["params"]["A"]


def test_the_builtin_family_record_is_refused_in_one_line_saying_why(capsys):
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "trunk" / "builtin" / "runs.jsonl"
    code = fit_main([str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "1 run(s)" in err and "single point" in err


def test_two_size_sweep_is_refused_and_a_weak_one_warns_but_writes_strict_json(tmp_path, capsys):
    two = _trainer_records(tmp_path / "two.jsonl", widths=(64, 128), Gs=(1, 2), budgets=(2e12, 2e13))
    code = fit_main([str(two), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "2 distinct N value(s)" in err and "needs runs at >= 3 values of N" in err
    weak = _trainer_records(tmp_path / "weak.jsonl", noise=0.03, widths=(64, 72, 80), Gs=(1, 2, 3), budgets=(2e12,))
    out = tmp_path / "weak.json"
    code, io = _run([str(weak), "--grid", "hoffmann", "--json", str(out), "--plots", str(tmp_path / "p"),
                     "--no-progress"], capsys)
    assert code == 0 and "Traceback" not in io.err
    assert "one compute budget" in io.err and "spans only" in io.err
    doc = _strict_load(out)
    assert all(v is None or np.isfinite(v) for v in doc["params"].values())
    assert (tmp_path / "p" / "residuals_family.png").exists()


def test_branch_law_refuses_l_dense_from_too_few_dense_runs(tmp_path, capsys):
    recs = _trainer_records(tmp_path / "few.jsonl", widths=(64, 96, 128, 192), Gs=(1, 3), budgets=(2e12,))
    code = fit_main([str(recs), "--law", "branch", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "L_dense" in err and "4 run(s) cannot determine 5 free parameters" in err


@pytest.mark.slow
def test_fix_delta_and_gamma_reading_reach_the_fit(csv_runs, tmp_path, capsys):
    out = tmp_path / "fit.json"
    code, io = _run([str(csv_runs), "--grid", "hoffmann", "--fix", "a=6", "--fix", "B=2980.958", "--delta", "0.01",
                     "--gamma-on", "learnable", "--delta-scan", "--json", str(out), "--no-progress"], capsys)
    doc = _strict_load(out)
    assert code == 0 and doc["params"]["A"] == pytest.approx(np.exp(6.0)) and doc["params"]["B"] == pytest.approx(2980.958)
    assert doc["fixed"] == {"a": 6.0, "b": pytest.approx(np.log(2980.958))}
    assert doc["delta"] == 0.01 and doc["gamma_on"] == "learnable"
    assert [r["delta"] for r in doc["delta_scan"]] == [1e-4, 1e-3, 1e-2, 1e-1]
    assert "held fixed, not fitted" in io.out
    for bad, fragment in ((["--fix", "a"], "expected NAME=NUMBER"), (["--fix", "zeta=1"], "cannot fix"),
                          (["--delta", "0"], "--delta must be a positive number")):
        code = fit_main([str(csv_runs), "--no-progress", *bad])
        assert code == 2 and fragment in capsys.readouterr().err


def test_strict_json_replaces_non_finite_numbers():
    from fitting.cli import strict_json
    clean, where = strict_json({"A": float("inf"), "x": [1.0, float("nan")], "ok": np.float64(2.5)})
    assert clean == {"A": None, "x": [1.0, None], "ok": 2.5} and where == ["A", "x[1]"]
    json.dumps(clean, allow_nan=False)
