"""Paths listed in artefacts stay inside their folder (issue 10 item 8): a checkpoint whose family.json
lists `../x` as a tokenizer file makes `familial-deploy split` refuse in one line, reading and writing
nothing outside; a shard manifest naming a file outside the shard directory is refused by
`familial-deploy verify` and by a node (`familial-serve --tier ...`) before anything is hashed."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BAD_NAMES = ["../secret.txt", "/etc/hostname", "sub/../../secret.txt", "..\\secret.txt", "link/secret.txt"]


def _cli(module: str, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def _one_line_2(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr


def _deploy(capsys, *args) -> subprocess.CompletedProcess:
    """`familial-deploy` in this process (a fresh interpreter per case would cost seconds each)."""
    from deploy.cli import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, cap.out, cap.err)


def _with_outside(tmp_path: Path, inner: Path) -> Path:
    """A secret next to `inner` and a symlink from inside it to where the secret is."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the shards\n")
    (inner / "link").symlink_to(tmp_path, target_is_directory=True)
    return secret


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_split_refuses_a_tokenizer_file_outside_the_checkpoint(make_ckpt, tmp_path, capsys, bad):
    src, _ = make_ckpt("tied")
    ckpt = tmp_path / "work" / "ckpt"
    shutil.copytree(src, ckpt)
    _with_outside(tmp_path / "work", ckpt)
    meta = json.loads((ckpt / "family.json").read_text())
    meta["tokenizer"]["files"].append(bad)
    (ckpt / "family.json").write_text(json.dumps(meta))
    out = tmp_path / "work" / "deep" / "out"
    before = sorted(p for p in tmp_path.rglob("*"))
    r = _cli("deploy.cli", "split", ckpt, "--out", out) if bad == BAD_NAMES[0] else \
        _deploy(capsys, "split", ckpt, "--out", out)
    _one_line_2(r, "tokenizer file")
    assert repr(bad) in r.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before   # nothing written anywhere, inside --out or not


def _shards(make_ckpt, tmp_path) -> Path:
    from deploy.shards import split_checkpoint

    ckpt, _ = make_ckpt("tied")
    d = tmp_path / "work" / "shards"
    split_checkpoint(ckpt, d, "device=0,edge=1,cloud=2..")
    return d


def _rewrite(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_manifest_naming_a_file_outside_is_refused_by_verify_and_by_a_node(make_ckpt, tmp_path, capsys, bad):
    d = _shards(make_ckpt, tmp_path)
    secret = _with_outside(tmp_path / "work", d)
    from deploy.manifest import file_record

    # an entry with the right size and hash of the outside file: only the path check can stop it
    rec = {**file_record(secret).to_dict(), "file": bad}
    _rewrite(d, lambda m: m["tokenizer"]["files"].append(rec))
    _one_line_2(_deploy(capsys, "verify", d), "manifest.json entry")
    if bad in BAD_NAMES[:2]:  # the node as a real process
        _one_line_2(_cli("serving.cli", "--tier", "device", "--shards", d, "--port", "0"), "manifest.json entry")
    else:
        from deploy.manifest import ShardError
        from deploy.shards import load_tier

        with pytest.raises(ShardError, match="manifest.json entry"):
            load_tier(d, "device")


def test_onnx_entry_outside_is_refused(make_ckpt, tmp_path, capsys):
    d = _shards(make_ckpt, tmp_path)
    _rewrite(d, lambda m: m.setdefault("onnx", {}).update({"device": {"file": "../device.onnx", "bytes": 1,
                                                                       "sha256": "0" * 64}}))
    _one_line_2(_deploy(capsys, "verify", d), "'../device.onnx'")


def test_shard_file_entry_must_be_its_canonical_name(make_ckpt, tmp_path):
    d = _shards(make_ckpt, tmp_path)
    _rewrite(d, lambda m: m["shards"][1].update(file="../shard-1.safetensors"))
    _one_line_2(_cli("serving.cli", "--tier", "edge", "--shards", d, "--port", "0"), "shard 1: file")


def test_files_in_subfolders_inside_stay_allowed(make_ckpt, tmp_path):
    from deploy.manifest import file_record
    from deploy.shards import verify_dir

    d = _shards(make_ckpt, tmp_path)
    (d / "extra").mkdir()
    (d / "extra" / "notes.txt").write_text("inside\n")
    _rewrite(d, lambda m: m["tokenizer"]["files"].append({**file_record(d / "extra" / "notes.txt").to_dict(),
                                                          "file": "extra/notes.txt"}))
    assert verify_dir(d).tokenizer.files[-1].file == "extra/notes.txt"
