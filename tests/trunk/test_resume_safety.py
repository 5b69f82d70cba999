"""Resuming reads trainer_state.pt without running code (issue 10 item 7): a crafted state file whose
pickle would create a file is refused by `familial-train --resume` in one line, and the file is not
created; honest state files, including ones written before the RNG state became plain data, resume."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trunk.cli import main
from trunk.data import prepare

REPO = Path(__file__).resolve().parents[2]


class _RunsCommand:
    """Unpickling this calls os.system(cmd): what an attacker would put in trainer_state.pt."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Touches:
    """Unpickling this calls pathlib.Path.touch (no shell at all)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real run stopped at step 2 of 4 (checkpoint + trainer_state.pt at step 2), and its CLI args."""
    root = tmp_path_factory.mktemp("resume")
    src = root / "src"
    src.mkdir()
    (src / "a.py").write_text("".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(200)))
    prepare([str(src)], root / "data", tokenizer="byte", val_fraction=0.2, progress=False)
    args = ["--preset", "tiny", "--data", str(root / "data"), "--seq-len", "32", "--batch-size", "2",
            "--warmup-steps", "1", "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--threads", "1",
            "--steps", "4", "--save-every", "2"]
    out = root / "run"
    assert main([*args, "--out", str(out), "--stop-at", "2"]) == 0
    return out, args


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _resume_cli(out: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trunk.cli", *args, "--out", str(out), "--resume", "auto"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("payload", ["shell", "touch"])
def test_crafted_trainer_state_is_refused_and_runs_nothing(stopped_run, tmp_path, payload):
    out = _copy_run(stopped_run[0], tmp_path / "run")
    marker = tmp_path / "PWNED"
    evil = (lambda m: _RunsCommand(f"touch {m}")) if payload == "shell" else _Touches
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    # the payload is real: a full unpickle (what resume used to do) creates the file
    torch.save({**state, "optimizer": evil(tmp_path / "control")}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control").exists()
    torch.save({**state, "optimizer": evil(marker)}, out / "trainer_state.pt")
    p = _resume_cli(out, stopped_run[1])
    assert not marker.exists(), "loading the trainer state ran the attacker's code"
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "trainer_state.pt: refused: it names" in p.stderr, p.stderr


def test_garbage_and_foreign_state_files_are_one_line(stopped_run, tmp_path, capsys):
    out = _copy_run(stopped_run[0], tmp_path / "run")
    (out / "trainer_state.pt").write_bytes(b"not a torch file at all")
    assert main([*stopped_run[1], "--out", str(out), "--resume", "auto"]) == 2
    assert "not a readable trainer state" in capsys.readouterr().err
    torch.save({"step": 2}, out / "trainer_state.pt")
    assert main([*stopped_run[1], "--out", str(out), "--resume", "auto"]) == 2
    assert "not a trainer state" in capsys.readouterr().err


def test_honest_state_resumes_including_the_older_numpy_format(stopped_run, tmp_path):
    out = _copy_run(stopped_run[0], tmp_path / "new")
    p = _resume_cli(out, stopped_run[1])
    assert p.returncode == 0, p.stderr
    # a state written before the NumPy RNG state became plain data held a pickled NumPy array
    old = _copy_run(stopped_run[0], tmp_path / "old")
    state = torch.load(old / "trainer_state.pt", weights_only=True)
    n = state["rng"]["numpy"]
    state["rng"]["numpy"] = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    torch.save(state, old / "trainer_state.pt")
    assert main([*stopped_run[1], "--out", str(old), "--resume", "auto"]) == 0
    assert (old / "runs.jsonl").is_file()
