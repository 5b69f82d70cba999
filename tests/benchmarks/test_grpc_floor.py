"""benchmarks/grpc_floor.py: real gRPC round trips against an echo server in another process."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_grpc_floor_measures_every_style(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grpc_floor.py"), "--out", str(tmp_path),
                        "--calls", "60", "--tag", "t"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "grpc_floor_t.json").read_text())
    assert [r["bytes"] for r in res["rows"]] == [4096, 1 << 20]
    for r in res["rows"]:
        for k in ("aio_stream_us", "aio_unary_us", "sync_unary_us"):
            assert 1.0 < r[k] < 1e6, (k, r)
    assert res["rows"][1]["aio_stream_us"] > res["rows"][0]["aio_stream_us"]  # 1 MiB costs more than 4 KiB
    assert "aio stream" in p.stdout
