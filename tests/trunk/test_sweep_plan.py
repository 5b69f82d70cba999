"""The sweep file and its plan: shapes, D from the full FLOP count, baselines, fractions, errors, --help."""
import dataclasses
import json
import math

import pytest

from trunk.cli import build_parser, main
from trunk.flops import flops_per_token, param_counts
from trunk.shape_rule import ShapeRule, exit_layers, ladder, nearest_shape
from trunk.sweep import Estimate, SizeSpec, SweepConfig, SweepError, TrainRule, parse_sweep, plan_sweep
from trunk.sweep_cli import SWEEP_KEYS
from trunk.sweep_runner import Ledger
from trunk.train import TrainConfig, lr_at

DATA = {"fingerprint": "test", "train_tokens": 10_000_000, "val_tokens": 100_000, "vocab_size": 512}
SHAPE = {"head_dim": 16, "width_multiple": 16, "aspect_ratio": 16, "aspect_tolerance": 1.5, "min_layers": 4}
TRAIN = {"seq_len": 64, "target_steps": 50, "min_batch": 4, "max_batch": 64, "micro_batch": 16,
         "eval_sequences": 64, "warmup_frac": 0.1, "save_points": 2}


def _doc(**kw):
    doc = {"out": "o", "data": "d", "budgets": ["1e12", 3e12], "sizes": [1e5, 4e5], "G": [1, 2, 4],
           "shape": SHAPE, "train": TRAIN}
    doc.update(kw)
    return doc


def _plan(**kw):
    return plan_sweep(parse_sweep(_doc(**kw)), data=DATA)


def test_shape_rule_ladder_and_exits():
    rule = ShapeRule(**SHAPE)
    shapes = ladder(rule, 512, 64)
    Ns = [param_counts(c).non_embedding for c in shapes]
    assert Ns == sorted(Ns) and all(c.d_model % 16 == 0 and c.n_layers >= 4 for c in shapes)
    assert all(16 / 1.5 - 1e-9 <= c.d_model / c.n_layers <= 16 * 1.5 + 1e-9 for c in shapes)
    c = nearest_shape(3e5, shapes, rule)
    n = param_counts(c).non_embedding
    assert all(abs(math.log(n / 3e5)) <= abs(math.log(m / 3e5)) + 1e-12 for m in Ns)
    assert exit_layers(8, [0.25, 0.5, 0.75]) == (2, 4, 6) and exit_layers(5, [0.5]) == (3,)
    with pytest.raises(Exception, match="distinct"):
        exit_layers(4, [0.1, 0.2])


def test_plan_budget_steps_batch_and_fractions():
    plan = _plan()
    grid = [r for r in plan.runs if r.role == "grid"]
    assert len(grid) == 2 * 2 * 3  # budgets x sizes x G
    for r in plan.runs:
        t = r.train
        gb = t["batch_size"] * t["grad_accum"]
        D = r.budget / r.flops_per_token
        assert r.flops_per_token == flops_per_token(__import__("trunk.config").config.FamilyConfig.from_dict(r.model), 64)
        if r.role == "grid":  # D from the full FLOP count, rounded up to whole steps
            assert r.steps == math.ceil(D / (gb * 64)) and r.tokens == r.steps * gb * 64
            assert r.flops >= r.budget > r.flops - gb * 64 * r.flops_per_token
        assert gb & (gb - 1) == 0 and 4 <= gb <= 64
        assert t["warmup_steps"] == max(1, round(0.1 * r.steps)) < r.steps or r.steps == 1
        assert t["batch_size"] * t["eval_batches"] == 64  # one validation set for every run
        assert t["min_lr"] == pytest.approx(t["lr"] * 0.1)
        assert t["save_every"] == math.ceil(r.steps / 2)
        TrainConfig.from_dict({**t, "data": "x"})  # every planned field is a real TrainConfig field
    # budgets ascending; within a budget dense runs (G = 1) before families
    assert [r.budget for r in plan.runs] == sorted(r.budget for r in plan.runs)
    first = plan.runs[:len([r for r in plan.runs if r.budget == 1e12])]
    assert [r.G > 1 for r in first] == sorted(r.G > 1 for r in first)


def test_same_compute_baselines_share_the_G1_run():
    plan = _plan()
    keys = {r.key: r for r in plan.runs}
    assert len(keys) == len(plan.runs)  # each run planned once
    for fam in (r for r in plan.runs if r.G > 1):
        base = [keys[k] for k in fam.dense_for_exits]
        depths = list(fam.model["exit_layers"]) + [fam.model["n_layers"]]
        assert [b.model["n_layers"] for b in base] == depths
        assert all(b.G == 1 and b.model["d_model"] == fam.model["d_model"] and b.budget == fam.budget for b in base)
        assert base[-1].role == "grid"  # the final exit's baseline is the G = 1 grid run itself
        assert all(b.role == "dense" for b in base[:-1])


def test_same_D_baselines_train_the_familys_tokens():
    plan = _plan(dense_baselines="same_D")
    keys = {r.key: r for r in plan.runs}
    for fam in (r for r in plan.runs if r.G > 1):
        base = [keys[k] for k in fam.dense_for_exits]
        assert all(b.tokens == fam.tokens and b.G == 1 for b in base)
        assert base[-1].role == "dense"  # not the G = 1 run: that one has the budget's D
    assert not any(r.dense_for_exits for r in _plan(dense_baselines="off").runs)


def test_sizes_from_a_law_bracket_its_n_opt():
    law = {"A": 400.0, "alpha": 0.3, "B": 3000.0, "beta": 0.34}
    plan = _plan(sizes={"n_opt_multiples": [0.5, 1, 2], "law": law}, G=[1], budgets=[1e14, 1e15])
    shapes = ladder(ShapeRule(**SHAPE), 512, 64)
    for C, (N0, _) in plan.n_opt.items():
        def L(c):
            return law["A"] * param_counts(c).non_embedding ** -0.3 + law["B"] * (C / flops_per_token(c, 64)) ** -0.34
        assert N0 == param_counts(min(shapes, key=L)).non_embedding
        Ns = sorted(r.N for r in plan.runs if r.budget == C)
        assert Ns[0] < N0 * 1.01 and N0 * 0.99 < Ns[-1] and len(Ns) == 3


def test_fit_json_law_and_ladder_collisions(tmp_path):
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"law": "family", "params": {"E": 1, "A": 400, "alpha": 0.3, "B": 3000, "beta": 0.34,
                                                           "gamma": 0.03}}))
    cfg = parse_sweep(_doc(sizes={"n_opt_multiples": [1, 1.0001], "law": "fit.json"}, G=[1]), base=tmp_path)
    plan = plan_sweep(cfg, data=DATA)
    assert cfg.sizes.law_source == str(fit) and any("same ladder shape" in n for n in plan.notes)
    assert len(plan.runs) == 2  # one size per budget: the two targets fell on one shape


def test_keys_ignore_where_a_run_writes_but_not_what_it_trains():
    a, b = _plan(), _plan(train={**TRAIN, "compile": True, "threads": 1})
    assert [r.key for r in a.runs] == [r.key for r in b.runs]
    c = _plan(train={**TRAIN, "lr": 1e-3})
    assert not {r.key for r in a.runs} & {r.key for r in c.runs}
    d = plan_sweep(parse_sweep(_doc()), data={**DATA, "fingerprint": "other"})
    assert not {r.key for r in a.runs} & {r.key for r in d.runs}


@pytest.mark.parametrize("bad, needle", [
    ("budgets: [1e12\n", "cannot parse"),
    ("- 1\n- 2\n", "must be a mapping"),
    (None, "missing key 'G'"),
    ({"budgetz": [1]}, "unknown key 'budgetz'"),
    ({"budgets": ["lots"]}, "budgets[0] must be a number"),
    ({"budgets": [-1]}, "positive"),
    ({"dense_baselines": "same_N"}, "dense_baselines must be one of"),
    ({"exits": {2: [0.5, 0.7]}}, "exits[2] must be 1 increasing"),
    ({"train": {**TRAIN, "warmup_steps": 5}}, "set by the sweep"),
    ({"train": {**TRAIN, "micro_batch": 12}}, "power of two"),
    ({"train": {**TRAIN, "eval_sequences": 24}}, "multiple of train.micro_batch"),
    ({"train": {**TRAIN, "bogus": 1}}, "unknown key 'train.bogus'"),
    ({"train": {**TRAIN, "compile": "yes"}}, "train.compile must be a bool"),
    ({"train": {**TRAIN, "dtype": "fp8"}}, "train.dtype must be auto, bfloat16 or float32"),
    ({"shape": {**SHAPE, "width_multiple": 24}}, "multiple of shape.head_dim"),
    ({"shape": {**SHAPE, "d_model": 64}}, "unknown key 'shape.d_model'"),
    ({"sizes": {"n_opt_multiples": [1]}}, "needs sizes.law"),
    ({"sizes": {"n_opt_multiples": [1], "law": "missing.json"}}, "not a readable familial-fit"),
    ({"G": [1, 9]}, "exit layers"),
])
def test_bad_sweep_files_fail_with_one_line(tmp_path, capsys, bad, needle):
    path = tmp_path / "sweep.yaml"
    if isinstance(bad, str):
        path.write_text(bad)
    else:
        doc = _doc(data=str(tmp_path), vocab_size=512)
        doc.pop("G") if bad is None else doc.update(bad)
        path.write_text(json.dumps(doc))
    rc = main(["sweep", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and needle in err, err


def test_dry_run_without_data_plans_from_vocab_size(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(_doc(data=str(tmp_path / "none"), out=str(tmp_path / "out"), vocab_size=512)))
    assert main(["sweep", str(path), "--dry-run", "--budgets", "1e12"]) == 0
    out = capsys.readouterr().out
    assert "to run: 12 runs" in out and "1e12-d" in out and "3e12-d" not in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_help_documents_every_sweep_key(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    for opt in ("--dry-run", "--jobs", "--nproc-per-run", "--time-limit", "--budgets", "--out", "--data",
                "--peak-flops", "--no-progress"):
        assert opt in text
    for cls in (SweepConfig, SizeSpec, TrainRule, Estimate, ShapeRule):
        for f in dataclasses.fields(cls):
            if f.name not in ("source", "extra", "fields", "law_source", "N"):
                assert f.name in SWEEP_KEYS, (cls.__name__, f.name)
    assert SWEEP_KEYS.splitlines()[0] in text
    _, subs = build_parser()
    assert all(a.help for a in subs["sweep"]._actions)


def test_ledger_drops_a_half_written_last_line(tmp_path):
    good = {"sweep": {"key": "k1"}, "N": 1}
    (tmp_path / "runs.jsonl").write_text(json.dumps(good) + "\n" + '{"sweep": {"key": "k2"}, "N"')
    assert set(Ledger(tmp_path, repair=False).done) == {"k1"}
    assert (tmp_path / "runs.jsonl").read_text().endswith('"N"')  # dry runs leave it alone
    led = Ledger(tmp_path)
    assert led.repaired and (tmp_path / "runs.jsonl").read_text() == json.dumps(good) + "\n"
    (tmp_path / "runs.jsonl").write_text("not json\n")
    with pytest.raises(SweepError, match="runs.jsonl:1"):
        Ledger(tmp_path)


def test_warmup_never_swallows_a_short_run():
    t = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=50)
    lrs = [lr_at(s, t, 40) for s in range(40)]
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 19  # warmup capped at half the run
    assert lrs[-1] < 0.01
    assert lr_at(9, TrainConfig(lr=1.0, warmup_steps=10), 1000) == pytest.approx(1.0)  # long runs unchanged


@pytest.mark.parametrize("path", ["examples/sweep.yaml", "benchmarks/isoflop/study.yaml",
                                  "benchmarks/isoflop/smoke.yaml"])
def test_shipped_sweep_files_plan(path, tmp_path):
    from pathlib import Path

    from trunk.sweep import load_sweep

    cfg = load_sweep(str(Path(__file__).resolve().parents[2] / path))
    cfg.data = str(tmp_path / "no-data")  # plan from vocab_size
    plan = plan_sweep(cfg)
    assert plan.runs and all(r.steps >= 10 for r in plan.runs)
    if path.endswith("study.yaml"):  # the study: >= 3 budgets, >= 5 sizes each, G 1-4, dense baselines
        assert len(cfg.budgets) >= 3 and cfg.G == [1, 2, 3, 4] and cfg.dense_baselines == "same_compute"
        for C in cfg.budgets:
            grid = [r for r in plan.runs if r.budget == C and r.role == "grid"]
            assert len({r.model["d_model"] * 1000 + r.model["n_layers"] for r in grid}) >= 5
            assert all(len(r.dense_for_exits) == r.G for r in grid if r.G > 1)


def test_compile_flag_keeps_runs_done(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(_doc(data=str(tmp_path / "none"), out=str(tmp_path / "out"), vocab_size=512)))
    assert main(["sweep", str(path), "--dry-run", "--compile"]) == 0
    a = capsys.readouterr().out
    assert main(["sweep", str(path), "--dry-run", "--no-compile"]) == 0
    assert capsys.readouterr().out == a
