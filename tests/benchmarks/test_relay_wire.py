"""benchmarks/relay_wire.py: times relay/wire.py's real encode and decode of a step and its reply."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_relay_wire_times_every_direction(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "relay_wire.py"), "--out", str(tmp_path),
                        "--rows", "1", "8", "--d-model", "64", "--repeats", "3", "--tag", "t"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "relay_wire_t.json").read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 8]
    for r in rows:
        parts = [r[k] for k in ("step_encode_us", "step_decode_us", "reply_encode_us", "reply_decode_us")]
        assert all(x > 0 for x in parts) and abs(r["hop_us"] - sum(parts)) < 0.5
    assert rows[1]["step_bytes"] > rows[0]["step_bytes"]  # 8 rows of hidden states weigh more than 1
