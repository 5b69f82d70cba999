"""`familial-train prepare` and the token sampler: folders, JSONL, BPE, splits, errors."""
import json

import numpy as np
import pytest

from trunk.cli import main
from trunk.data import DataError, TokenData, prepare, read_index
from trunk.tokenizer import load_tokenizer


def _tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    docs = {
        "pkg/a.py": "def add(a, b):\n    return a + b\n" * 20,
        "pkg/sub/b.txt": "plain text, with ünïcode\n" * 30,
        "pkg/sub/c.md": "# Title\n\nSome *markdown*.\n" * 25,
        "pkg/skip.bin": "binary-ish file that must be ignored\n",
        "pkg/sub/d.py": "import os\nprint(os.getcwd())\n" * 15,
    }
    for rel, text in docs.items():
        (root / rel).write_text(text)
    return docs


def test_prepare_folder_byte_roundtrip(tmp_path):
    docs = _tree(tmp_path / "src")
    out = tmp_path / "data"
    index = prepare([str(tmp_path / "src")], out, tokenizer="byte", val_fraction=0.25, progress=False)
    assert index == read_index(out)
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 4  # .bin skipped
    assert index["splits"]["val"]["documents"] >= 1 and index["dtype"] == "uint16"
    tok = load_tokenizer(out)
    streams = []
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            arr = np.fromfile(out / shard["file"], dtype=np.uint16)
            assert len(arr) == shard["tokens"]
            streams.append(arr)
    # every document comes back exactly once, each followed by eos
    got = sorted(tok.decode_bytes(part).decode() for a in streams
                 for part in np.split(a, np.where(a == tok.eos_id)[0] + 1) if len(part))
    want = sorted(t for rel, t in docs.items() if not rel.endswith(".bin"))
    assert got == want


def test_prepare_jsonl_bpe_and_sampler(tmp_path):
    src = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with open(src, "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n")
    out = tmp_path / "data"
    index = prepare([str(src)], out, tokenizer="bpe", vocab_size=300, progress=False, shard_tokens=500)
    assert 259 < index["vocab_size"] <= 300 and index["tokenizer"]["type"] == "bpe"  # tiny corpus: fewer merges
    assert len(index["splits"]["train"]["shards"]) > 1  # rolled over into several shards
    data = TokenData(out, seq_len=16)
    W = data.num_windows("train")
    a = data.train_batch(5, 4, seed=1)
    assert a.shape == (4, 17) and a.max() < index["vocab_size"]
    np.testing.assert_array_equal(a, data.train_batch(5, 4, seed=1))      # pure function of the cursor
    np.testing.assert_array_equal(a[2:], data.train_batch(7, 2, seed=1))
    epoch = np.concatenate([data.train_batch(i, 1, seed=1) for i in range(W)])
    assert len({row.tobytes() for row in epoch}) == len({tuple(w) for w in data.splits["train"].windows.tolist()})
    v = data.val_batch(0, 2, 3)
    assert v.shape == (2, 17)


def test_prepare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("   \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    cases = [
        ([str(tmp_path / "empty")], "no input files"),
        ([str(tmp_path / "blank")], "input is empty"),
        ([str(tmp_path / "missing")], "no such file"),
        ([str(tmp_path / "bad.jsonl")], "bad.jsonl:2"),
    ]
    for inputs, needle in cases:
        rc = main(["prepare", *inputs, "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, inputs
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    with pytest.raises(DataError):
        TokenData(tmp_path / "empty", 8)
