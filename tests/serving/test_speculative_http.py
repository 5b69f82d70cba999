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


# ---- planning: a latency budget buys the deep exit through speculation -----------------------------

EDGE_MS = 60.0   # every edge step sleeps this long: exits 1 and 2 cost >= 60 ms a token, exit 0 ~1 ms


@pytest.fixture(scope="module")
def slow_edge(tiny_ckpt):
    from serving_helpers import ServerThread

    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny", delays_ms={"edge": EDGE_MS})
    with ServerThread(build_app(eng)) as s:
        s.engine = eng
        yield s


def test_budget_buys_the_target_exit_with_speculation(slow_edge):
    budget = 600.0   # 16 plain tokens at exit 1 or 2: ~1 s; speculating exit 2 at this family's acceptance: ~0.25 s
    plain = complete(slow_edge, max_tokens=16, exit="auto", latency_budget_ms=budget)["familial"]
    assert plain["exits"][0] == 0 and plain.get("speculative") is None
    # one request at a fixed exit measures the pair (drafts by exit 0, verified at exit 2) ...
    complete(slow_edge, max_tokens=16, speculative={"k": 8})
    pair = slow_edge.engine.latency_model()["speculative"]["0->2"]
    assert pair["rounds_measured"] >= 1 and pair["alpha"] > 0.5
    # ... so the planner now predicts the deep exit's speculative time inside the budget
    fam = complete(slow_edge, max_tokens=16, exit="auto", latency_budget_ms=budget,
                   speculative={"mode": "auto", "k": 8})["familial"]
    s = fam["speculative"]
    assert fam["exits"][0] == 2 and s["planned"] and s["predicted_tokens_per_round"] > 2 and s["drafted"] > 0
    assert fam["predicted_ms"] < budget
    # a budget plain decoding fits: "auto" does not speculate
    fam = complete(slow_edge, max_tokens=4, exit="auto", latency_budget_ms=20_000.0, speculative="auto")["familial"]
    assert fam["exits"] == [2] * 4 and fam["speculative"]["planned"] is False and fam["speculative"]["drafted"] == 0
