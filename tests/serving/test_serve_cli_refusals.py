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
])
def test_flag_mistakes_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err, err
    assert err.startswith("familial-serve: error: ")


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
