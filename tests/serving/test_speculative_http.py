"""`speculative` over HTTP: a LocalEngine chain (device=0, edge=1, cloud=2, each its own tier engine)
behind the real app on loopback. Greedy answers equal the plain ones; `familial` reports per token
whether it was an accepted draft and, on each round's last token, drafts checked and accepted."""
from __future__ import annotations

import httpx
import pytest

from serving.app import build_app
from serving.engine import LocalEngine


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    from serving_helpers import ServerThread

    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny", chain=True)
    with ServerThread(build_app(eng)) as s:
        yield s


def complete(server, **body):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [5, 9, 2, 7], "max_tokens": 14,
                                                        "temperature": 0, "exit": 2, "ignore_eos": True, **body},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_greedy_speculative_equals_plain_and_reports_rounds(server):
    plain = complete(server)
    spec = complete(server, speculative={"k": 3, "adaptive": False})
    assert spec["text"] == plain["text"]
    fam = spec["familial"]
    n = len(fam["exits"])
    assert n == 14 and fam["exits"] == [2] * n and len(fam["draft"]) == len(fam["drafted"]) == len(fam["accepted"]) == n
    s = fam["speculative"]
    assert s["drafted"] == sum(fam["drafted"]) > 0 and s["accepted"] == sum(fam["accepted"]) == sum(fam["draft"])
    assert s["rounds"] == sum(1 for d in fam["drafted"] if d) and all(d <= 3 for d in fam["drafted"])
    assert "draft" not in plain["familial"] or plain["familial"]["draft"] is None


def test_speculative_stream_and_chat(server):
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 10, "temperature": 0, "exit": "cloud",
                            "ignore_eos": True, "stream": True, "speculative": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                import json
                chunks.append(json.loads(line[6:]))
    fams = [c["choices"][0]["familial"] for c in chunks if c["choices"]]
    assert sum(len(f["exits"]) for f in fams) == 10
    assert sum(len(f["drafted"]) for f in fams) == 10 and fams[-1]["speculative"]["rounds"] >= 1
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                         "temperature": 0, "exit": 2, "speculative": {"k": 2}})
    assert r.status_code == 200 and r.json()["choices"][0]["familial"]["speculative"] is not None


def test_speculative_draft_exit_off_the_head_tier_is_a_400(server):
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "ab", "max_tokens": 4, "speculative": {"draft_exit": 1}})
    assert r.status_code == 400 and "speculative" in r.text
