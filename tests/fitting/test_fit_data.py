"""Run readers: format from content, which runs feed which law, per-exit expansion for the branch law."""
import json

import numpy as np
import pytest

from fitting.data import DataError, branch_runs, family_runs, read_rows


def test_csv_without_g_is_dense_and_budget_defaults_to_6nd(tmp_path):
    p = tmp_path / "runs.txt"                       # the extension says nothing; the content decides
    p.write_text("N,D,loss\n1e8,2e9,3.1\n2e8,1e9,3.0\n")
    r = family_runs(read_rows(p), dense_only=True)
    assert r.n == 2 and np.all(r.G == 1)
    np.testing.assert_allclose(r.C, 6 * r.N * r.D)


def test_jsonl_budget_comes_from_flops_total_and_dense_keeps_g1(tmp_path):
    recs = [{"N": 1e8, "D": 1e9, "G": 1, "loss": 3.0, "flops_total": 7e17},
            {"N": 1e8, "D": 1e9, "G": 3, "loss": 3.1, "flops_total": 8e17}]
    p = tmp_path / "runs.csv"                      # JSONL despite the name
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    fam = family_runs(read_rows(p))
    np.testing.assert_allclose(fam.C, [7e17, 8e17])
    assert family_runs(read_rows(p), dense_only=True).n == 1


def test_branch_rows_from_run_records():
    rec = {"N": 1.2e8, "D": 1e9, "G": 3, "loss": 3.0, "n_layers": 12, "exit_layers": [4, 8],
           "exit_val_loss": [3.3, 3.0, 2.8], "exit_dense_loss": [3.2, 2.95, 2.79]}
    r = branch_runs([rec, {"N": 1e8, "D": 1e9, "G": 1, "loss": 3.0}])
    np.testing.assert_allclose(r.P, [0, 1, 2])
    np.testing.assert_allclose(r.Q, [2, 1, 0])                      # exits after; P: exits before
    np.testing.assert_allclose(r.G, [3, 3, 3])
    np.testing.assert_allclose(r.loss, [3.3, 3.0, 2.8])
    np.testing.assert_allclose(r.N, [4e7, 8e7, 1.2e8])
    del rec["exit_dense_loss"]
    r = branch_runs([rec], dense_predict=lambda N, D: 2.0 + 1e8 / N)
    np.testing.assert_allclose(r.L_dense, 2.0 + 1e8 / np.array([4e7, 8e7, 1.2e8]))
    with pytest.raises(DataError, match="no exit_dense_loss"):
        branch_runs([rec])
    with pytest.raises(DataError, match="2 exit losses for 3 exits"):
        branch_runs([{**rec, "exit_val_loss": [3.0, 2.9]}], dense_predict=lambda N, D: N * 0 + 3)


def test_n_kind_picks_the_records_n_or_n_total(tmp_path):
    recs = [{"schema": "familial.run/v1", "N": 1e8, "N_total": 1.3e8, "D": 1e9, "G": 1, "loss": 3.0},
            {"N": 2e8, "N_total": 2.3e8, "D": 1e9, "G": 3, "loss": 2.9, "n_layers": 6, "exit_layers": [2, 4],
             "exit_val_loss": [3.1, 3.0, 2.9], "exit_dense_loss": [3.0, 2.95, 2.85]}]
    p = tmp_path / "runs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rows = read_rows(p)
    np.testing.assert_allclose(family_runs(rows).N, [1e8, 2e8])
    np.testing.assert_allclose(family_runs(rows, n_kind="total").N, [1.3e8, 2.3e8])
    # per exit: the exit's share of N, plus the embedding (N_total - N) when counting total parameters
    np.testing.assert_allclose(branch_runs(rows, n_kind="total").N, 3e7 + 2e8 * np.array([2, 4, 6]) / 6)
    with pytest.raises(DataError, match="N_total"):
        family_runs([{"N": 1.0, "D": 1.0, "G": 1, "loss": 1.0}], n_kind="total")


def test_records_of_another_schema_or_with_non_numbers_are_refused(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"schema": "familial.run/v9", "N": 1, "D": 1, "G": 1, "loss": 1}\n')
    with pytest.raises(DataError, match="familial.run/v9"):
        read_rows(p)
    p.write_text('{"N": 1e8, "D": 1e9, "G": 1, "loss": null}\n')
    with pytest.raises(DataError, match="loss must be a number"):
        family_runs(read_rows(p))
    p.write_text('{"N": 1}\n[1, 2]\n')                     # JSONL (first line) with a non-object line
    with pytest.raises(DataError, match=r"r.jsonl:2: not a JSON object"):
        read_rows(p)
