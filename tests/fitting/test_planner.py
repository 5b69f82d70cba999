"""The tier planner: a feasible plan meets every tier limit, its trainer config loads in trunk, its FLOPs
agree with trunk.flops, exit placement is the best feasible one, and bad tier files fail clearly."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from fitting import planner
from fitting.cli import plan_main
from fitting.laws import PAPER, frontier
from trunk.config import FamilyConfig
from trunk.flops import flops_per_token, param_counts

ROOT = Path(__file__).resolve().parents[2]
TIERS = ROOT / "examples" / "tiers.yaml"
INFEASIBLE = ROOT / "examples" / "tiers_infeasible.yaml"


@pytest.fixture(scope="module")
def plan_1e20():
    return planner.plan(1e20, planner.load_tiers(TIERS))


def test_plan_meets_every_tier_limit(plan_1e20):
    pl = plan_1e20
    assert pl["G"] == 3 and [t["name"] for t in pl["tiers"]] == ["device", "edge", "cloud"]
    for t in pl["tiers"]:
        assert t["memory_gb"] <= t["memory_limit_gb"]
        assert t["latency_ms"] <= t["latency_target_ms"]
    layers = [t["layers"] for t in pl["tiers"]]
    assert layers[0][0] == 0 and all(a[1] == b[0] for a, b in zip(layers, layers[1:]))
    assert pl["notes"] == []


def test_plan_is_near_the_compute_optimal_n(plan_1e20):
    n_opt, _ = frontier(1e20, PAPER)
    assert 0.5 < plan_1e20["N"] / n_opt < 2.0


def test_trainer_config_loads_and_flops_agree_with_trunk(plan_1e20, tmp_path):
    out = tmp_path / "train.json"
    planner.write_outputs(plan_1e20, out)
    doc = json.loads(out.read_text())
    assert set(doc) == {"model", "train"}
    assert set(doc["train"]) == {"tokens", "seq_len", "batch_size", "lr", "warmup_steps"}
    cfg = FamilyConfig.from_dict(doc["model"])
    assert cfg.G == 3 and list(cfg.exit_layers) == [t["layers"][1] for t in plan_1e20["tiers"][:-1]]
    fpt = flops_per_token(cfg, doc["train"]["seq_len"])
    assert fpt == pytest.approx(plan_1e20["flops_per_token"], rel=1e-12)
    assert doc["train"]["tokens"] * fpt == pytest.approx(1e20, rel=1e-6)
    assert param_counts(cfg).non_embedding == plan_1e20["N"]
    from trunk.train import TrainConfig                               # the trainer accepts the section
    TrainConfig.from_dict(doc["train"])
    assert json.loads((tmp_path / "train.plan.json").read_text())["N"] == plan_1e20["N"]


def test_exit_placement_is_the_best_feasible_one():
    pc = planner.PlanConfig()
    tiers = planner.load_tiers(TIERS)
    cfg = planner.shape(1024, 9, (1, 2), pc)
    D = 1e10
    cut, costs, losses = planner.place_exits(cfg, D, tiers, pc, PAPER, planner.PAPER_BRANCH)
    best = None
    for c in itertools.combinations(range(1, 9), 2):                 # brute force, one placement at a time
        cuts = np.array([[0, *c, 9]])
        k = planner.tier_costs(cfg, cuts, tiers, pc)
        ok = all(k["memory_gb"][0, g] <= t.memory_gb and k["latency_ms"][0, g] <= t.latency_ms
                 for g, t in enumerate(tiers))
        score = planner.exit_losses(cfg, D, PAPER, planner.PAPER_BRANCH, cuts).mean()
        if ok and (best is None or score < best[0]):
            best = (score, c)
    assert tuple(cut[1:-1]) == best[1]
    assert losses.mean() == pytest.approx(best[0])


def test_infeasible_tier_file_exits_2_with_one_line_naming_the_limit(capsys):
    with pytest.raises(SystemExit) as e:
        plan_main(["--flops", "1e20", "--tiers", str(INFEASIBLE)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "infeasible" in err and "'device'" in err and "latency" in err


@pytest.mark.parametrize("doc, fragment", [
    ({}, "'tiers' list"),
    ({"tiers": [{"name": "d", "memory_gb": 1, "compute_tflops": 1, "bandwidth_gbs": 1}]}, "missing latency_ms"),
    ({"tiers": [{"name": "d", "memory_gb": 1, "compute_tflops": 1, "bandwidth_gbs": 1, "latency_ms": 5,
                 "colour": "red"}]}, "unknown field(s) colour"),
    ({"tiers": [{"name": "d", "memory_gb": -1, "compute_tflops": 1, "bandwidth_gbs": 1, "latency_ms": 5}]},
     "memory_gb must be a positive number"),
    ({"tiers": {"d": {"memory_gb": 1, "compute_tflops": 1, "bandwidth_gbs": 1, "latency_ms": 5},
                "c": {"memory_gb": 1, "compute_tflops": 1, "bandwidth_gbs": 1, "latency_ms": 5}}},
     "tier 'c': missing rtt_ms, link_gbps"),
])
def test_bad_tier_files_are_refused_clearly(doc, fragment):
    with pytest.raises(planner.PlanError, match=None) as e:
        planner.parse_tiers(doc)
    assert fragment in str(e.value)


def test_cli_writes_config_and_refuses_bad_budget(tmp_path, capsys):
    out = tmp_path / "cfg.json"
    assert plan_main(["--flops", "3e19", "--tiers", str(TIERS), "--out", str(out)]) == 0
    assert FamilyConfig.from_dict(json.loads(out.read_text())["model"]).G == 3
    with pytest.raises(SystemExit) as e:
        plan_main(["--flops", "-1", "--tiers", str(TIERS)])
    assert e.value.code == 2 and "--flops must be a positive number" in capsys.readouterr().err


def test_plan_uses_a_fitted_law(tmp_path, plan_1e20):
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"law": "family", "params": {**PAPER.as_dict(), "E": 0.9}}))  # lower floor
    pl = planner.plan(1e20, planner.load_tiers(TIERS), p=planner.load_law(law))
    assert pl["predicted"]["family_loss"] < plan_1e20["predicted"]["family_loss"]
    law.write_text(json.dumps({"law": "dense", "params": {}}))
    with pytest.raises(planner.PlanError, match="family-law fit"):
        planner.load_law(law)


def test_full_flop_frontier_spends_the_budget_and_brackets_the_plan(plan_1e20):
    f = planner.flops_per_token_curve(3, planner.PlanConfig())
    for d in (512, 2048, 4096):                                       # the curve passes through trunk.flops
        cfg = planner.shape(d, max(4, round(d / (48 + 16 * np.log2(d / 256)))), (1, 2), planner.PlanConfig())
        N = param_counts(cfg).non_embedding
        assert f(N) == pytest.approx(flops_per_token(cfg, 2048), rel=1e-9)
    N, D = planner.full_flops_frontier(1e20, 3)
    assert D * f(float(N)) == pytest.approx(1e20, rel=1e-9)
    assert f(float(N)) > 6 * N                                        # attention and heads cost extra
    assert 0.5 < plan_1e20["N"] / plan_1e20["frontier_full_flops"]["N_opt"] < 2.0
