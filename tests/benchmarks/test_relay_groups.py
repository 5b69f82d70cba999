"""benchmarks/relay_groups.py: three real relay.cli processes, the head's micro-batches swept."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_relay_groups_runs_every_setting(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "relay_groups.py"), "--out", str(tmp_path),
                        "--requests", "4", "--tokens", "6", "--micro-batches", "1", "3", "--delay-ms", "0", "5",
                        "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "relay_groups.json").read_text())
    assert [(r["delay_ms"], r["micro_batches"]) for r in res["runs"]] == [(0.0, 1), (0.0, 3), (5.0, 1), (5.0, 3)]
    for r in res["runs"]:
        assert r["tokens"] == 4 * 6 and r["tok_s"] > 0
        assert set(r["tiers"]) == {"device", "edge", "cloud"}
        # every tier ran the steps it was sent; deeper tiers never more than the head (no split below it)
        steps = [r["tiers"][t]["steps"] for t in ("device", "edge", "cloud")]
        assert steps[0] >= steps[1] >= steps[2] > 0, steps
    assert (tmp_path / "relay_groups.png").stat().st_size > 0


def test_relay_groups_refuses_bad_settings(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "relay_groups.py"), "--out", str(tmp_path),
                        "--micro-batches", "0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--micro-batches" in p.stderr.splitlines()[-1]
