"""The pycorpus preset: installed Python source and docs, deduplicated by content, as a `prepare` preset."""
import json
import sys

import numpy as np

from trunk.cli import main
from trunk.corpus import python_corpus, python_roots
from trunk.data import read_index


def test_dedupe_skips_and_nested_roots(tmp_path):
    lib = tmp_path / "lib"
    site = lib / "site-packages"
    for d in (lib / "pkg", site / "a", site / "a-1.0.dist-info", site / "a" / "__pycache__"):
        d.mkdir(parents=True)
    (lib / "pkg" / "x.py").write_text("print('x')\n")
    (site / "a" / "copy_of_x.py").write_text("print('x')\n")         # same bytes: dropped
    (site / "a" / "y.pyi").write_text("def y() -> int: ...\n")
    (site / "a" / "README.md").write_text("# a\n")
    (site / "a" / "data.json").write_text("{}\n")                     # not a wanted extension
    (site / "a" / "big.py").write_text("#" * 5000 + "\n")              # over max_file_bytes
    (site / "a-1.0.dist-info" / "LICENSE.txt").write_text("license\n")  # package metadata: skipped
    (site / "a" / "__pycache__" / "z.py").write_text("cached\n")
    c = python_corpus([lib, site], max_file_bytes=1000, progress=False)
    assert sorted(c.documents) == sorted(["print('x')\n", "def y() -> int: ...\n", "# a\n"])
    assert c.duplicates == 1 and c.skipped_large == 1 and c.files_seen == 4
    # the nested site-packages is counted as itself, not under the outer root
    assert c.by_root == {str(lib): 1, str(site): 2}
    assert c.bytes == sum(len(d.encode()) for d in c.documents)
    capped = python_corpus([lib, site], max_file_bytes=1000, max_bytes=1, progress=False)
    assert capped.truncated and len(capped.documents) == 1


def test_roots_are_this_pythons_stdlib_and_site_packages():
    roots = python_roots()
    assert any((r / "os.py").is_file() for r in roots)  # the standard library
    assert any(r.name in ("site-packages", "dist-packages") for r in roots)


def test_prepare_preset_reports_tokens_and_reuses_a_tokenizer(tmp_path, capsys):
    out = tmp_path / "py"
    assert main(["prepare", "--preset", "pycorpus", "--max-bytes", "400000", "--tokenizer", "bpe",
                 "--vocab-size", "300", "--out", str(out), "--no-progress"]) == 0
    line = capsys.readouterr().out
    index = read_index(out)
    s = index["splits"]
    assert f"{s['train']['tokens']} train + {s['val']['tokens']} val tokens" in line
    corpus = index["corpus"]
    assert corpus["preset"] == "pycorpus" and corpus["truncated"] and corpus["bytes"] >= 400000
    assert corpus["unique_documents"] == s["train"]["documents"] + s["val"]["documents"]
    assert any(sys.prefix in r or r.startswith(sys.base_prefix) for r in corpus["roots"])
    # the same corpus tokenized with the saved vocabulary gives the same tokens
    again = tmp_path / "again"
    assert main(["prepare", "--preset", "pycorpus", "--max-bytes", "400000", "--tokenizer-from", str(out),
                 "--out", str(again), "--no-progress"]) == 0
    a = np.fromfile(out / "train_000.bin", dtype=np.uint16)
    b = np.fromfile(again / "train_000.bin", dtype=np.uint16)
    np.testing.assert_array_equal(a, b)
    assert json.loads((again / "tokenizer.json").read_text()) == json.loads((out / "tokenizer.json").read_text())


def test_prepare_usage_errors_are_one_line(tmp_path, capsys):
    for argv, needle in ((["prepare", "--out", str(tmp_path)], "INPUT paths or --preset"),
                         (["prepare", str(tmp_path), "--preset", "pycorpus", "--out", str(tmp_path)], "not both"),
                         (["prepare", "--preset", "nope", "--out", str(tmp_path)], "invalid choice"),
                         (["prepare", str(tmp_path), "--tokenizer-from", str(tmp_path / "x"), "--out",
                           str(tmp_path / "o"), "--no-progress"], "")):
        if not needle:
            (tmp_path / "a.txt").write_text("some text\n" * 20)
            needle = "missing tokenizer config"
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err
