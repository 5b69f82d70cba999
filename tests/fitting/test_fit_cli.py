"""familial-fit end to end: CSV and JSONL run records, every law, --json schema, plots, paper figures,
--help coverage and one-line errors with exit status 2."""
import json

import numpy as np
import pytest

from fitting.cli import _fit_parser, _plan_parser, fit_main
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
    assert doc["fixed"] == {"D_d": PAPER_BRANCH.D_d} and doc["params"]["D_d"] == PAPER_BRANCH.D_d
    for k, v in PAPER_BRANCH.as_dict().items():
        assert doc["params"][k] == pytest.approx(v, rel=1e-3)
    # D_d held at another value: alpha_P, beta_Q rescale by (D_d / D_d')^a, a and the fit do not change
    code, _ = _run([str(path), "--law", "branch", "--branch-Dd", "1e8", "--keep", "64", "--json", str(out),
                    "--no-progress"], capsys)
    doc = json.loads(out.read_text())
    scale = (PAPER_BRANCH.D_d / 1e8) ** PAPER_BRANCH.a
    assert code == 0 and doc["fixed"] == {"D_d": 1e8} and doc["params"]["D_d"] == 1e8
    assert doc["params"]["a"] == pytest.approx(PAPER_BRANCH.a, rel=1e-3)
    assert doc["params"]["beta_Q"] == pytest.approx(PAPER_BRANCH.beta_Q * scale, rel=1e-3)
    assert (tmp_path / "p" / "fig5_6_branch_law.png").stat().st_size > 0
    # run records: exits expanded, L_dense from a dense fit to the G == 1 records
    code, io = _run([str(jsonl_runs), "--law", "branch", "--grid", "hoffmann", "--no-progress"], capsys)
    assert code == 0 and "L_dense from a dense-law fit to 43 G == 1 runs" in io.out


def test_plots_and_paper_figures_render(csv_runs, tmp_path, capsys):
    code, _ = _run([str(csv_runs), "--grid", "hoffmann", "--plots", str(tmp_path / "fit"),
                    "--paper-figures", str(tmp_path / "paper"), "--no-progress"], capsys)
    assert code == 0
    for name in ("residuals_family", "fig1_loss_surfaces", "fig2_isoloss_frontier"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "fit" / f"{name}.{ext}").stat().st_size > 1000
    for name in ("fig1_loss_surfaces", "fig2_isoloss_frontier", "fig5_6_branch_law", "fig7_efficiency_leverage"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "paper" / f"{name}.{ext}").stat().st_size > 1000
    code, _ = _run(["--paper-figures", str(tmp_path / "alone")], capsys)   # no RUNS needed
    assert code == 0 and (tmp_path / "alone" / "fig7_efficiency_leverage.png").exists()


@pytest.mark.parametrize("content, fragment", [
    ("", "is empty"),
    ("N,D,G\n1e8,1e10,1\n", "no 'loss' field"),
    ("N,D,G,loss\n1e8,abc,1,3.0\n", "non-numeric value"),
    ("N,D,G,loss\n1e8,1e10,1,-3.0\n", "every loss must be a positive number"),
    ('{"N": 1e8, "D": 1e10, "G": 1, "loss": 3.0}\n{oops\n', "not a JSON object"),
    ("N,D,G,loss\n1e8,1e10,1,3.0\n2e8,1e10,1,2.9\n", "2 runs cannot determine 6 parameters"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        fit_main([str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_missing_file_and_missing_runs_are_clear(capsys, tmp_path):
    for argv, fragment in (([str(tmp_path / "nope.csv")], "cannot read"), ([], "RUNS is required")):
        with pytest.raises(SystemExit) as e:
            fit_main(argv)
        assert e.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("make", [_fit_parser, _plan_parser])
def test_help_documents_every_flag(make):
    p = make()
    for a in p._actions:
        assert a.help, f"{a.option_strings or a.dest} has no help"
    text = p.format_help()
    for a in p._actions:
        for s in a.option_strings:
            assert s in text
