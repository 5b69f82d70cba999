"""`familial-deploy` exit codes: 0 on success, 2 and one stderr line on bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    """Run the CLI in a fresh interpreter (as the console script would)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "deploy.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_split_and_verify(make_ckpt, tmp_path, capsys):
    ckpt, _ = make_ckpt("tied")
    assert main(["split", str(ckpt), "--out", str(tmp_path / "sh"), "--tiers", "device=0,cloud=1.."]) == 0
    assert "device: shards [0]" in capsys.readouterr().out
    r = _cli("verify", tmp_path / "sh")
    assert r.returncode == 0 and r.stdout.startswith("ok: 3 shards"), r.stderr


def _one_line_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("familial-deploy: error: "), err


def test_bad_input_exits_2_with_one_line(make_ckpt, tmp_path, capsys):
    ckpt, _ = make_ckpt("tied")
    _one_line_exit_2(capsys, ["split", str(ckpt), "--out", str(tmp_path / "a"), "--tiers", "device=0,cloud=2.."],
                     "cover shards")
    _one_line_exit_2(capsys, ["split", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "family.json")
    _one_line_exit_2(capsys, ["verify", str(tmp_path / "nope")], "manifest.json: not found")
    assert main(["split", str(ckpt), "--out", str(tmp_path / "sh")]) == 0
    shard = tmp_path / "sh" / "shard-2.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    _one_line_exit_2(capsys, ["verify", str(tmp_path / "sh")], "shard-2.safetensors")


@pytest.mark.parametrize("argv", [[], ["split"], ["split", "x"], ["frobnicate"], ["split", "x", "--out", "y", "--dtype", "int3"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("familial-deploy: error: "), err


def test_usage_error_in_a_real_process():
    r = _cli("split", "x", "--out", "y", "--dtype", "int3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("familial-deploy: error: "), r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["split", "--help"], ["export-onnx", "--help"], ["verify", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage" in capsys.readouterr().out
