"""The HTTP API over a LocalEngine on loopback: the official openai client, errors, auth, limits."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from serving.app import build_app
from serving.engine import LocalEngine
from serving.settings import ServeSettings


@pytest.fixture(scope="module")
def local_server(tiny_ckpt):
    from serving_helpers import ServerThread

    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny")
    with ServerThread(build_app(eng)) as s:
        yield s


def test_openai_completions(local_server):
    c = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused")
    r = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                             extra_body={"latency_budget_ms": 5000})
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    fam = r.choices[0].model_extra["familial"]
    assert len(fam["exits"]) == len(fam["tiers"]) == r.usage.completion_tokens
    assert fam["budget_met"] is True and set(fam["latency_ms"]) >= {"queue", "network", "total", *fam["tiers"]}
    assert r.usage.prompt_tokens == 5 and r.usage.total_tokens == 5 + r.usage.completion_tokens
    # greedy + fixed exit is deterministic
    a = c.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, extra_body={"exit": 2})
    b = c.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, extra_body={"exit": "cloud"})
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].model_extra["familial"]["exits"] == [2] * a.usage.completion_tokens


def test_openai_completions_stream(local_server):
    c = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused")
    chunks = list(c.completions.create(model="tiny", prompt="Hi", max_tokens=7, stream=True, seed=3,
                                       extra_body={"latency_budget_ms": 5000, "exit": "edge"}))
    assert chunks[-1].choices[0].finish_reason is not None and chunks[-1].usage.completion_tokens >= 1
    exits = [e for ch in chunks for e in ch.choices[0].model_extra["familial"]["exits"]]
    assert exits == [1] * chunks[-1].usage.completion_tokens


def test_openai_chat(local_server):
    c = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, extra_body={"latency_budget_ms": 4000})
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens == len(r.choices[0].model_extra["familial"]["exits"])
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"latency_budget_ms": 4000})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_raw_sse_ends_with_done(local_server):
    with httpx.stream("POST", local_server.url + "/v1/completions",
                      json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        lines = [l for l in r.iter_lines() if l]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(l.startswith("data: ") for l in lines)


def test_stop_string(local_server):
    # find what greedy decoding writes, then ask it to stop at a piece of it
    c = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused")
    full = c.completions.create(model="tiny", prompt="ab", max_tokens=12, temperature=0, extra_body={"exit": 0})
    text = full.choices[0].text
    i = next(i for i in range(1, len(text)) if text[i] != "\ufffd")
    stop = text[i:i + 2] if len(text) > i + 1 else text[i]
    r = c.completions.create(model="tiny", prompt="ab", max_tokens=12, temperature=0, stop=[stop],
                             extra_body={"exit": 0})
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    with httpx.stream("POST", local_server.url + "/v1/completions",
                      json={"prompt": "ab", "max_tokens": 12, "temperature": 0, "exit": 0, "stop": stop,
                            "stream": True}) as s:
        import json
        chunks = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == text[: text.index(stop)]


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x" * 300}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "exit": 7}, "exit"),
    ({"prompt": "x", "exit": "moon"}, "exit"),
    ({"prompt": "x", "latency_budget_ms": -5}, "latency_budget_ms"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [1, 2, 100000]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
])
def test_4xx_openai_shape(local_server, body, param):
    e = _err(httpx.post(local_server.url + "/v1/completions", json=body), 400)
    assert e["param"] == param


def test_4xx_misc(local_server):
    _err(httpx.post(local_server.url + "/v1/completions", content=b"{not json",
                    headers={"content-type": "application/json"}), 400)
    _err(httpx.post(local_server.url + "/v1/chat/completions", json={"messages": []}), 400)
    e = _err(httpx.post(local_server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert e["code"] == "model_not_found"
    _err(httpx.get(local_server.url + "/v1/nothing"), 404)
    c = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", n=3)


def test_models_health_metrics(local_server):
    m = httpx.get(local_server.url + "/v1/models").json()["data"][0]
    assert m["id"] == "tiny" and [e["tier"] for e in m["exits"]] == ["device", "edge", "cloud"]
    assert [e["val_loss"] for e in m["exits"]] == [3.1, 2.6, 2.2]
    assert httpx.get(local_server.url + "/health").json()["status"] == "ok"
    httpx.post(local_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "latency_budget_ms": 1e4})
    text = httpx.get(local_server.url + "/metrics").text
    for name in ("familial_requests_total", "familial_time_to_first_token_seconds_bucket",
                 "familial_time_per_output_token_seconds", "familial_e2e_request_latency_seconds",
                 "familial_generation_tokens_total", "familial_tokens_by_exit_total", "familial_budget_misses_total",
                 "familial_degraded_replies_total", "familial_router_decision_seconds"):
        assert name in text, name
    assert 'familial_requests_total{endpoint="completions",status="200"}' in text


def test_api_key(tiny_ckpt, serve):
    s = serve(build_app(LocalEngine.from_checkpoint(tiny_ckpt, name="tiny"), ServeSettings(api_key="sekrit")))
    e = _err(httpx.post(s.url + "/v1/completions", json={"prompt": "x"}), 401)
    assert e["code"] == "invalid_api_key"
    _err(httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="wrong").completions.create(model="tiny", prompt="x")
    r = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit").completions.create(model="tiny", prompt="x",
                                                                                   max_tokens=2)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(s.url + "/health").status_code == 200  # health and metrics stay open


def test_429_when_full(tiny_ckpt, serve):
    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny", delays_ms={"device": 20})
    s = serve(build_app(eng, ServeSettings(max_concurrency=1, max_queue=0, retry_after_s=2)))
    httpx.get(s.url + "/health")
    started = threading.Event()

    def long_request():
        with httpx.stream("POST", s.url + "/v1/completions",
                          json={"prompt": "x", "max_tokens": 40, "stream": True, "exit": 0, "ignore_eos": True}, timeout=30) as r:
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(20)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    e = _err(r, 429)
    assert r.headers["retry-after"] == "2" and e["type"] == "rate_limit_error"
    t.join()
    assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_disconnect_frees_local_session(tiny_ckpt, serve):
    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny", delays_ms={"device": 10})
    s = serve(build_app(eng, ServeSettings(max_concurrency=1, max_queue=0)))
    with httpx.stream("POST", s.url + "/v1/completions",
                      json={"prompt": "x", "max_tokens": 200, "stream": True, "exit": 0, "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break
    assert eng.live_requests() <= 1
    deadline = time.time() + 2
    while eng.live_requests() and time.time() < deadline:
        time.sleep(0.02)
    assert eng.live_requests() == 0
    # the gone client's slot is free again: with room for one request, the next one is served
    assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert 'familial_requests_total{endpoint="completions",status="499"} 1.0' in httpx.get(s.url + "/metrics").text


def test_replan_steps_down_when_running_late(tiny_ckpt, serve):
    # Calibrated with a 10 ms cloud, the planner picks the cloud exit; then the cloud slows to 150 ms
    # per token mid-request, and the router must step down (and say so) to finish within the budget.
    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny", delays_ms={"edge": 2, "cloud": 10})
    s = serve(build_app(eng))
    httpx.get(s.url + "/health")
    n = 30
    budget = eng.planner.plan_for(2, 2, n).predicted_ms / 0.7
    import json
    with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                      json={"prompt": "ab", "max_tokens": n, "stream": True, "latency_budget_ms": budget,
                            "ignore_eos": True}) as r:
        chunks = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                eng.set_delay("cloud", 150.0)
    fam = chunks[-1]["choices"][0]["familial"]
    exits = [e for ch in chunks for e in ch["choices"][0]["familial"]["exits"]]
    assert exits[0] == 2 and fam["replans"], fam
    rp = fam["replans"][0]
    assert rp["from_exit"] == 2 and rp["to_exit"] < 2 and "late" in rp["reason"]
    assert all(e == exits[0] for e in exits[: rp["at_token"]]) and exits[rp["at_token"]] == rp["to_exit"]
    assert max(exits[rp["at_token"]:]) < 2 and fam["budget_met"], fam
