"""`familial-serve` refuses what it would otherwise ignore or crash on, in one line with exit status 2:
flags the chosen role does not use (issue 10 item 6), and a shard the node refuses (item 9: it was a
30-line traceback)."""
from __future__ import annotations

import pytest

from serving.cli import main
from serving_helpers import spawn_serve


@pytest.mark.parametrize("argv,needle", [
    (["--tier", "router", "--checkpoint", "c", "--shards", "s"], "--shards: not used by the router"),
    (["--tier", "router", "--family", "f.yaml", "--next", "h:1", "--dtype", "float16"],
     "--next, --dtype: not used by the router"),
    (["--tier", "router", "--family", "f.yaml", "--next-tls-ca", "ca.pem"], "--next-tls-ca: not used by the router"),
    (["--tier", "device", "--shards", "s", "--api-key", "k"], "--api-key: not used by a relay node"),
    (["--tier", "edge", "--shards", "s", "--family", "f.yaml", "--max-body-mb", "2"],
     "--family, --max-body-mb: not used by a relay node"),
    (["--tier", "cloud"], "--shards DIR is required"),
    (["--tier", "router"], "exactly one of --family YAML or --checkpoint DIR"),
    (["--tier", "router", "--checkpoint", "c", "--body-timeout-s", "0"], "--body-timeout-s must be > 0"),
    (["--tier", "router", "--port", "notaport"], "invalid int value"),
    (["--tier", "router", "--family", "f.yaml", "--shard", "s"], "unrecognized arguments: --shard s"),  # exact names
    (["--tier", "edge", "--shards", "s", "--api-key=k"], "--api-key: not used by a relay node"),
    (["--bogus"], "--tier"),
])
def test_flag_mistakes_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert err.startswith("familial-serve: error: ")


@pytest.mark.parametrize("argv", [["--tier", "edge", "--shards", "s", "--inject-delay-ms", "5"],
                                  ["demo", "--inject-delay-ms", "edge=20"]])
def test_no_test_only_flags_in_production(argv, capsys):
    # tests and benchmarks slow tiers down through tests/slow_tiers.py, not a familial-serve flag
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--inject-delay-ms" in err, err


def test_slow_tiers_launcher_refuses_a_bad_spec(capsys):
    from tests.slow_tiers import main as slow, parse_delays

    assert parse_delays("edge=20,cloud=80") == {"edge": 20.0, "cloud": 80.0}
    assert slow(["--tier", "edge"]) == 2 and "TIER=MS" in capsys.readouterr().err
    assert slow(["edge=5", "--tier", "router", "--checkpoint", "c"]) == 2
    assert "not the router" in capsys.readouterr().err


def test_refused_shard_is_one_line(tiny_ckpt, tmp_path):
    from deploy.shards import split_checkpoint

    d = tmp_path / "shards"
    split_checkpoint(tiny_ckpt, d, "device=0,edge=1,cloud=2..")
    shard = d / "shard-1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    proc = spawn_serve(["--tier", "edge", "--shards", d, "--port", "0"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert out.count("\n") == 1 and "Traceback" not in out, out
    assert out.startswith("familial-serve: error: tier edge: ") and "shard-1.safetensors: sha256" in out, out
