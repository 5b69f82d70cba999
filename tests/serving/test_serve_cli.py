"""`familial-serve`: every flag documented, family.yaml parsing, the router from a family file and
`familial-serve demo` as real subprocesses (curl-equivalent request, clean Ctrl-C shutdown)."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from serving.cli import build_demo_parser, build_parser, load_family_yaml
from serving_helpers import spawn_serve, stop, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("make", [build_parser, build_demo_parser])
def test_every_flag_has_help(make):
    p = make()
    for a in p._actions:
        assert a.help, f"{a.option_strings} has no help"
    text = p.format_help()
    for a in p._actions:
        for opt in a.option_strings:
            assert opt in text


def test_example_family_yaml_parses():
    fam = load_family_yaml(ROOT / "examples" / "family.yaml")
    assert [t["name"] for t in fam["tiers"]] == ["device", "edge", "cloud"]
    assert fam["tiers"][0]["address"] == "127.0.0.1:50051" and fam["tls"] is None


def test_demo_prints_curl_line_that_streams(tiny_ckpt):
    proc = spawn_serve(["demo", "--checkpoint", str(tiny_ckpt), "--port", "0"])
    m, _ = wait_for(proc, r"curl -N (http://\S+)/v1/chat/completions .* -d '(.*)'\n")
    url, body = m.group(1), json.loads(m.group(2))
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = [l for l in r.iter_lines() if l.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= 2  # EOS may come first
        assert httpx.get(url + "/health").json()["tiers"] == {"device": True, "edge": True, "cloud": True}
    finally:
        rest = stop(proc)
    assert proc.returncode == 0, rest
    assert "familial demo stopped" in rest and "Traceback" not in rest, rest


def test_router_from_family_yaml(tiny_ckpt, tmp_path):
    from deploy.shards import split_checkpoint
    from serving_helpers import NodeChain

    split_checkpoint(tiny_ckpt, tmp_path / "shards", "device=0,edge=1,cloud=2..")
    with NodeChain(tmp_path / "shards") as chain:
        y = tmp_path / "family.yaml"
        y.write_text("name: tiny-family\ntokenizer: shards\ntiers:\n" + "".join(
            f"  - name: {t}\n    address: {a}\n" for t, a in chain.addresses.items()))
        proc = spawn_serve(["--tier", "router", "--family", str(y), "--port", "0", "--api-key", "k1",
                       "--calibrate-rounds", "1"])
        m, _ = wait_for(proc, r"familial router on (http://\S+)/v1")
        url = m.group(1)
        try:
            h = {"Authorization": "Bearer k1"}
            r = httpx.post(url + "/v1/completions", headers=h, json={"model": "tiny-family", "prompt": "hi",
                                                                    "max_tokens": 3}, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
            assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        finally:
            rest = stop(proc)
        assert proc.returncode == 0, rest


def _node_pids(out: str) -> dict[str, int]:
    import re

    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+) node on \S+ \(pid (\d+)\)", out)}


def _gone(pid: int, timeout: float = 15) -> bool:
    import os
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


def test_demo_stops_with_one_line_when_a_node_dies(tiny_ckpt):
    import os
    import signal

    proc = spawn_serve(["demo", "--checkpoint", str(tiny_ckpt), "--port", "0"])
    _, out = wait_for(proc, r"curl -N http://\S+/v1/chat")
    pids = _node_pids(out)
    assert set(pids) == {"device", "edge", "cloud"}, out
    os.kill(pids["cloud"], signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, rest
    assert "familial-serve: error: demo stopped: the cloud node exited with status -9" in rest, rest
    assert _gone(pids["device"]) and _gone(pids["edge"])


def test_demo_nodes_die_with_the_demo(tiny_ckpt):
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    proc = spawn_serve(["demo", "--checkpoint", str(tiny_ckpt), "--port", "0"])
    _, out = wait_for(proc, r"curl -N http://\S+/v1/chat")
    proc.send_signal(signal.SIGKILL)  # no clean-up runs in the demo: the nodes must still go
    proc.wait(10)
    assert all(_gone(pid) for pid in _node_pids(out).values()), out
