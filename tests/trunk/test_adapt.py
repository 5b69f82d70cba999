"""Exit adaptation (`--init FAMILY --train exits`): on a tiny imported Qwen2 the shallow exits' validation
loss falls while the trunk stays bit-identical, the optimizer holds state for the heads only, the run
record keeps the losses before and after; distillation to the final exit trains too."""
from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from tests.trunk.hf_models import write_model  # noqa: E402
from trunk.checkpoint import load_checkpoint  # noqa: E402
from trunk.cli import main  # noqa: E402
from trunk.data import prepare  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while familial models exit early on device edge and cloud".split()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """An imported random Qwen2 (4 layers, exits at 1 and 2 with one branch layer each) and data
    tokenized with its own tokenizer."""
    root = tmp_path_factory.mktemp("adapt")
    write_model("qwen2", root / "hf")
    assert main(["import-hf", str(root / "hf"), "--exits", "1,2", "--branch-layers", "1", "--out", str(root / "fam")]) == 0
    src = root / "src"
    src.mkdir()
    rng = random.Random(0)
    for i in range(16):  # a small repetitive language, so heads can learn it in a few steps
        (src / f"{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(30)))
    prepare([str(src)], root / "data", tokenizer=str(root / "fam"), val_fraction=0.2, progress=False)
    return root


def _adapt(family, out, *extra):
    return main(["--init", str(family / "fam"), "--train", "exits", "--data", str(family / "data"), "--out", str(out),
                 "--steps", "30", "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "3",
                 "--eval-every", "0", "--eval-batches", "2", "--no-progress", "--threads", "1", *extra])


def test_exit_loss_falls_trunk_frozen(family, tmp_path):
    assert _adapt(family, tmp_path / "run") == 0
    rec = json.loads((tmp_path / "run" / "runs.jsonl").read_text().splitlines()[-1])
    before, after = rec["exit_val_loss_before"], rec["exit_val_loss"]
    assert after[0] < before[0] - 0.3 and after[1] < before[1] - 0.3, (before, after)  # the exits learn
    assert after[2] == pytest.approx(before[2], abs=1e-6)                             # the final exit cannot
    a = rec["adaptation"]
    assert a["train"] == "exits" and a["init"] == str(family / "fam") and a["trainable_params"] > 0
    init, _, _ = load_checkpoint(family / "fam")
    adapted, tok, meta = load_checkpoint(tmp_path / "run")
    assert tok.kind == "hf" and [e["val_loss"] for e in meta["exits"]] == pytest.approx(after)
    new, old = adapted.state_dict(), init.state_dict()
    assert all(torch.equal(new[k], old[k]) for k in old if not k.startswith("heads."))   # bit-identical trunk
    assert not all(torch.equal(new[k], old[k]) for k in old if k.startswith("heads."))
    # AdamW state exists for the trainable parameters only
    state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=False)
    n_state = sum(p.numel() for s in state["optimizer"]["state"].values() for p in [s["exp_avg"]])
    assert n_state == a["trainable_params"] < a["frozen_params"]


def test_distillation_to_final_exit(family, tmp_path):
    assert _adapt(family, tmp_path / "run", "--distill", "0.5", "--distill-temp", "2") == 0
    rec = json.loads((tmp_path / "run" / "runs.jsonl").read_text())
    assert rec["adaptation"]["distill"] == 0.5 and rec["adaptation"]["distill_temp"] == 2.0
    assert rec["exit_val_loss"][0] < rec["exit_val_loss_before"][0]


def test_adaptation_errors(family, tmp_path, capsys):
    assert _adapt(family, tmp_path / "a", "--preset", "tiny") == 2
    assert "--init takes the architecture" in capsys.readouterr().err
    assert main(["--init", str(family / "fam"), "--distill", "0.5", "--data", str(family / "data"), "--out",
                 str(tmp_path / "b"), "--steps", "1", "--seq-len", "32", "--no-progress"]) == 2
    assert "distill needs train=exits" in capsys.readouterr().err
    assert _adapt(family, tmp_path / "c", "--train", "heads") == 2
    assert "train must be one of all, exits" in capsys.readouterr().err
    other = tmp_path / "byte_data"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("hello world " * 400)
    prepare([str(tmp_path / "t")], other, tokenizer="byte", val_fraction=0.2, progress=False)
    assert main(["--init", str(family / "fam"), "--train", "exits", "--data", str(other), "--out", str(tmp_path / "d"),
                 "--steps", "1", "--seq-len", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tokenized with a byte tokenizer" in err and "--tokenizer" in err
