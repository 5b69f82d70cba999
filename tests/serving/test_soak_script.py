"""benchmarks/soak.py runs end to end in a short, dense configuration (nodes and router as processes,
chaos, mixed traffic) and writes a complete report. Slow: several processes on 2 cores for ~1 min."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_smoke(tmp_path):
    if not (ROOT / "trunk" / "builtin" / "family.json").is_file():
        pytest.skip("no built-in family")
    port = random.Random(os.getpid()).randrange(21000, 29000, 20)
    p = subprocess.run([sys.executable, "benchmarks/soak.py", "--minutes", "0.3", "--clients", "2",
                        "--chaos-min-s", "3", "--chaos-max-s", "5", "--warmup-s", "2", "--drain-s", "3",
                        "--port", str(port), "--out", str(tmp_path / "soak")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "soak.json").read_text())
    s = res["summary"]
    assert s["requests"] > 0 and s["chaos_events"] and (tmp_path / "soak.png").stat().st_size > 0
    assert set(s["sessions_left"]["per_tier"]) == {"device", "edge", "cloud"}
    assert {g["role"] for g in s["rss"]} >= {"device", "edge", "cloud", "router"}
    assert s["outcomes_by_kind"].get("malformed", {}).keys() <= {"400"}     # every malformed body is a 400
    assert "sessions left" in p.stdout and "answers > 1.1x budget" in p.stdout
