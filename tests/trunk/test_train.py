"""The trainer: end-to-end run, exact resume, 2-process DDP (gloo) == 1 process, CLI errors and help."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trunk.checkpoint import load_checkpoint
from trunk.cli import build_parser, main
from trunk.data import prepare
from trunk.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]
RUN_KEYS = {"schema", "run_id", "N", "N_total", "D", "G", "exit_layers", "n_layers", "flops_per_token",
            "flops_total", "exit_val_loss", "loss", "config", "time"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(12):  # varied byte text so the loss moves
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
    prepare([str(src)], root / "data", tokenizer="byte", val_fraction=0.2, progress=False)
    return root / "data"


def _args(data, out, *extra):
    return ["--preset", "tiny", "--data", str(data), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--warmup-steps", "2", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1",
            "--no-progress", "--threads", "1", *extra]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))}


def test_end_to_end_checkpoint_and_run_record(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data_dir, out, "--steps", "6", "--model", "d_model=48", "--exit-layers", "1,3")) == 0
    model, tok, meta = load_checkpoint(out)
    assert model.cfg.d_model == 48 and model.cfg.exits == (1, 3, 4)
    assert meta["step"] == 6 and meta["tokens_seen"] == 6 * 4 * 32
    rec = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert RUN_KEYS <= set(rec) and rec["schema"] == "familial.run/v1"
    assert rec["G"] == 3 and rec["exit_layers"] == [1, 3] and rec["n_layers"] == 4 and rec["D"] == 6 * 4 * 32
    assert rec["flops_total"] == pytest.approx(rec["flops_per_token"] * rec["D"])
    assert [e["val_loss"] for e in meta["exits"]] == pytest.approx(rec["exit_val_loss"])
    assert rec["loss"] == pytest.approx(sum(rec["exit_val_loss"]) / 3)
    assert rec["config"]["model"]["d_model"] == 48 and rec["config"]["train"]["steps"] == 6
    losses = _losses(out)
    assert losses[6] < losses[1]  # it learns
    # the saved weights reproduce the recorded validation loss of the final exit
    x = torch.tensor(tok.encode("def f3_7(x):\n    return x * 7 + 3\n"))[None]
    assert torch.isfinite(model(x)[-1]).all()


def test_resume_is_exact(data_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ("--steps", "8", "--grad-accum", "2", "--save-every", "2")
    assert main(_args(data_dir, full, *common)) == 0
    assert main(_args(data_dir, cut, *common, "--stop-at", "4")) == 0
    assert not (cut / "runs.jsonl").exists()  # an interrupted run writes no run record
    assert main(_args(data_dir, cut, *common, "--resume", "auto")) == 0
    a, b = _losses(full), _losses(cut)
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    ra = json.loads((full / "runs.jsonl").read_text())
    rb = json.loads((cut / "runs.jsonl").read_text())
    assert rb["exit_val_loss"] == pytest.approx(ra["exit_val_loss"], abs=1e-5)
    assert main(_args(data_dir, cut, *common, "--resume", "auto")) == 2  # finished: nothing to resume
    assert len((cut / "runs.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_torchrun_two_processes_match_one(data_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    shared = ("--steps", "4", "--eval-every", "2", "--grad-accum", "2")
    assert main(_args(data_dir, one, *shared, "--batch-size", "2")) == 0  # global batch 2 x 2 x 1 = 4
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trunk.cli", *_args(data_dir, two, *shared, "--batch-size", "1",
                                   "--device", "cpu")]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-5), step
    rec = json.loads((two / "runs.jsonl").read_text())
    assert rec["world_size"] == 2 and rec["global_batch"] == 4
    assert rec["exit_val_loss"] == pytest.approx(json.loads((one / "runs.jsonl").read_text())["exit_val_loss"], abs=2e-5)


def _one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err


def test_bad_configs_fail_with_one_line(data_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["--data", str(data_dir), "--out", out, "--steps", "1", "--no-progress"]
    _one_line_error(capsys, ["--preset", "tiny", "--exit-layers", "1,4", *base], "exit layers")
    _one_line_error(capsys, ["--preset", "nope", *base], "unknown preset")
    _one_line_error(capsys, ["--preset", "tiny", "--data", str(tmp_path / "none"), "--out", out, "--steps", "1"],
                    "not found")
    _one_line_error(capsys, ["--preset", "tiny", "--out", out, "--steps", "1"], "no training data")
    _one_line_error(capsys, ["--preset", "tiny", "--data", str(data_dir), "--out", out, "--flops", "1e6"],
                    "too small for one step")
    _one_line_error(capsys, ["--preset", "tiny", "--data", str(data_dir), "--out", out, "--tokens", "100",
                             "--steps", "3"], "exactly one of")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: tiny}\ntrain: {data: x, stepz: 3}\n")
    _one_line_error(capsys, ["--config", str(cfg)], "unknown train config field(s): stepz")
    cfg.write_text(json.dumps({"model": {"preset": "tiny", "widht": 3}}))
    cfg = cfg.rename(tmp_path / "c.json")
    _one_line_error(capsys, ["--config", str(cfg), *base], "unknown model config field(s): widht")
    _one_line_error(capsys, ["--no-such-flag"], "unrecognized arguments")
    _one_line_error(capsys, ["--preset", "tiny", *base, "--device", "cpu", "--cuda-graph"], "--cuda-graph: it needs CUDA")
    _one_line_error(capsys, ["--preset", "tiny", *base, "--compile-blocks", "--compile"], "--compile-blocks: --compile")


@pytest.mark.slow
def test_compiled_blocks_train_as_eager_ones(data_dir, tmp_path):
    """--compile-blocks (inductor, here its CPU code) trains as eager blocks do; the checkpoint keeps its names."""
    eager, comp = tmp_path / "eager", tmp_path / "comp"
    common = ("--steps", "4", "--exit-layers", "1,3", "--model", "branch_layers=1")
    assert main(_args(data_dir, eager, *common)) == 0
    assert main(_args(data_dir, comp, *common, "--compile-blocks")) == 0
    a, b = _losses(eager), _losses(comp)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    ma, _, _ = load_checkpoint(eager)
    mb, _, _ = load_checkpoint(comp)
    assert ma.state_dict().keys() == mb.state_dict().keys()
    for k, v in ma.state_dict().items():
        assert torch.allclose(mb.state_dict()[k], v, atol=1e-4), k


@pytest.mark.gpu
def test_cuda_graph_steps_train_as_eager_ones_and_resume(data_dir, tmp_path):
    """--cuda-graph replays one captured step: the same losses as eager steps (fp32), also across a resume."""
    eager, graph, cut = tmp_path / "eager", tmp_path / "graph", tmp_path / "cut"
    common = ("--steps", "12", "--save-every", "6", "--eval-every", "6", "--device", "cuda", "--dtype", "float32",
              "--exit-layers", "1,3")
    assert main(_args(data_dir, eager, *common)) == 0
    assert main(_args(data_dir, graph, *common, "--cuda-graph")) == 0
    assert main(_args(data_dir, cut, *common, "--cuda-graph", "--stop-at", "6")) == 0
    assert main(_args(data_dir, cut, *common, "--cuda-graph", "--resume", "auto")) == 0
    a, b, c = _losses(eager), _losses(graph), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
        assert c[step] == pytest.approx(b[step], abs=1e-4), step
    assert b[12] < b[1]
    ra, rb = (json.loads((d / "runs.jsonl").read_text()) for d in (eager, graph))
    assert rb["exit_val_loss"] == pytest.approx(ra["exit_val_loss"], abs=1e-4)
    assert rb["config"]["train"]["cuda_graph"] and rb["throughput"]["timed_steps"] == 12 - 4
    # with compiled blocks under the captured step: the same training up to the fused kernels' rounding
    both = tmp_path / "both"
    assert main(_args(data_dir, both, *common, "--cuda-graph", "--compile-blocks")) == 0
    d = _losses(both)
    for step in a:
        assert d[step] == pytest.approx(a[step], abs=2e-3), step


def test_cli_error_in_a_real_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "trunk.cli", "--preset", "tiny", "--exit-layers", "9",
                        "--data", str(tmp_path), "--steps", "1"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr


def test_help_documents_every_flag(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    for flag in ("--config", "--preset", "--exit-layers", "--model", "--tokenizer", "--vocab-size",
                 "--val-fraction", "--ext", "--exclude", "--shard-tokens"):
        assert flag in text
    _, subs = build_parser()
    for name, parser in subs.items():
        for action in parser._actions:
            assert action.help, (name, action.dest)  # every flag and positional has help=


def test_flops_budget_sets_tokens():
    from trunk.config import get_preset
    from trunk.flops import flops_per_token
    from trunk.train import make_plan

    cfg = get_preset("tiny")
    t = TrainConfig(flops=5e10, seq_len=32, batch_size=4, grad_accum=2)
    plan = make_plan(cfg, t, world=2)
    D = 5e10 / flops_per_token(cfg, 32)
    assert plan.global_batch == 16 and plan.steps == math.ceil(D / (16 * 32))
    assert plan.tokens >= D > plan.tokens - 16 * 32
