"""benchmarks/spy.py: the summary of py-spy's collapsed stacks, and a real recording when py-spy is here."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.spy import Recorder, find, summarise  # noqa: E402

RAW = """_run_module_as_main (<frozen runpy>:198);BaseEventLoop._run_once (base_events.py:1);EpollSelector.select (selectors.py:468) 50
_run_module_as_main (<frozen runpy>:198);BaseEventLoop._run_once (base_events.py:1);Handle._run (events.py:80);TierEngine._send (tier.py:844);wire.step_to_pb (wire.py:89) 30
_run_module_as_main (<frozen runpy>:198);BaseEventLoop._run_once (base_events.py:1);Handle._run (events.py:80);TierEngine._send (tier.py:844) 10
_run_module_as_main (<frozen runpy>:198);BaseEventLoop._run_once (base_events.py:1);Handle._run (events.py:80);Stage.forward (stage.py:1) 10
Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 25
not a stack line
"""


def test_summary_shares_idle_and_self():
    s = summarise(RAW)
    assert s["samples"] == 125 and s["idle"] == pytest.approx(75 / 125, abs=1e-3)  # select + the blocked thread
    top = dict(s["top"])
    assert top == {"TierEngine._send": 0.8, "wire.step_to_pb": 0.6, "Stage.forward": 0.2}  # of the 50 busy
    assert dict(s["self"]) == {"wire.step_to_pb": 0.6, "TierEngine._send": 0.2, "Stage.forward": 0.2}


@pytest.mark.skipif(find() is None, reason="py-spy is an optional tool, not installed here")
def test_recorder_on_a_real_process(tmp_path):
    code = "import time\ndef busy_loop():\n    while True:\n        sum(range(1000))\nbusy_loop()\n"
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        rec = Recorder({"child": p.pid}, tmp_path, rate=200)
        time.sleep(1.5)
        out = rec.stop()
    finally:
        p.kill()
        p.wait()
    assert out["child"]["samples"] > 20, out
    assert dict(out["child"]["top"]).get("busy_loop", 0) > 0.9
    assert (tmp_path / "spy_child.txt").is_file()
