"""Smaller HTTP items of issue 10 (item 9), over real servers: HEAD /health; /docs and /openapi.json
behind --api-key; a stream the engine cuts short ends with finish_reason "error" (never "stop") and
says why, through a real relay chain whose head node dies mid-stream."""
from __future__ import annotations

import json

import httpx
import pytest

from serving.app import build_app
from serving.engine import LocalEngine, RelayEngine
from serving.settings import ServeSettings
from serving_helpers import NodeChain, ServerThread


def test_head_health(tiny_ckpt, serve):
    s = serve(build_app(LocalEngine.from_checkpoint(tiny_ckpt, name="tiny")))
    r = httpx.head(s.url + "/health")
    assert r.status_code == 200 and r.content == b""
    assert httpx.get(s.url + "/health").json()["status"] == "ok"


def test_schema_pages_need_the_api_key(tiny_ckpt, serve):
    s = serve(build_app(LocalEngine.from_checkpoint(tiny_ckpt, name="tiny"), ServeSettings(api_key="k3y")))
    for path in ("/docs", "/openapi.json"):
        r = httpx.get(s.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        assert httpx.get(s.url + path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(s.url + path, headers={"Authorization": "Bearer k3y"}).status_code == 200
    schema = httpx.get(s.url + "/openapi.json", headers={"Authorization": "Bearer k3y"}).json()
    assert "/v1/completions" in schema["paths"] and "/openapi.json" not in schema["paths"]
    assert httpx.get(s.url + "/redoc").status_code == 404
    assert httpx.get(s.url + "/health").status_code == 200 and httpx.head(s.url + "/health").status_code == 200


def test_schema_pages_are_open_without_a_key(tiny_ckpt, serve):
    s = serve(build_app(LocalEngine.from_checkpoint(tiny_ckpt, name="tiny")))
    assert httpx.get(s.url + "/openapi.json").status_code == 200 and httpx.get(s.url + "/docs").status_code == 200


@pytest.fixture
def chain(tiny_ckpt, tmp_path):
    from deploy.shards import split_checkpoint
    from trunk.tokenizer import load_tokenizer

    split_checkpoint(tiny_ckpt, tmp_path / "shards", "device=0,edge=1,cloud=2..")
    with NodeChain(tmp_path / "shards", delays_ms={"device": 20}) as ch:
        eng = RelayEngine(ch.head, load_tokenizer(tmp_path / "shards"), name="tiny", tier_addresses=ch.addresses,
                          max_seq_len=256, timeout_s=5)
        with ServerThread(build_app(eng)) as server:
            yield ch, server


def test_stream_cut_short_ends_with_error_not_stop(chain):
    ch, server = chain
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 200, "stream": True, "exit": 0,
                            "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if len(chunks) == 3:
                    ch.call(ch.handles[0].stop(grace=0))      # the head node dies mid-stream
            elif line == "data: [DONE]":
                chunks.append("[DONE]")
    assert chunks[-1] == "[DONE]"
    last = chunks[-2]["choices"][0]
    assert last["finish_reason"] == "error", last
    assert last["familial"]["degraded"] is True and last["familial"]["degraded_reasons"], last
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    n = sum(len(c["choices"][0]["familial"]["exits"]) for c in chunks[:-1])
    assert 3 <= n < 200
