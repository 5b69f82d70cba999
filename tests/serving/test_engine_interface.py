"""The engine interface the handlers depend on: `exit_on_tier` and `latency_model` on the real engine,
and the whole HTTP face served from an engine that has nothing but the `Engine` protocol (no planner,
no tier engines), so the handlers cannot lean on anything else."""
from __future__ import annotations

import asyncio
import json

import httpx

from serving.app import build_app
from serving.engine import Engine, FamilyInfo, LocalEngine, TokenOutput
from serving.exit_policy import ExitInfo
from serving_helpers import ServerThread
from trunk.checkpoint import load_checkpoint
from trunk.tokenizer import ByteTokenizer


def test_exit_on_tier_is_the_tiers_best_quality_exit(tiny_ckpt):
    model, tok, _ = load_checkpoint(tiny_ckpt)
    meta = {"exits": [{"val_loss": 3.0}, {"val_loss": 1.9}, {"val_loss": 2.0}]}   # the middle exit measured best
    eng = LocalEngine(model, tok, meta, tiers="device=0,cloud=1..")
    assert eng.exit_on_tier("cloud") == 1 and eng.exit_on_tier("device") == 0
    assert eng.exit_on_tier("edge") is None and eng.exit_on_tier("") is None
    no_losses = LocalEngine(model, tok, None, tiers="device=0,cloud=1..")
    assert no_losses.exit_on_tier("cloud") == 2                     # without losses: the deepest


def test_latency_model_is_empty_until_start(tiny_ckpt):
    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny")

    async def go():
        assert eng.latency_model() == {}
        await eng.start(calibrate_rounds=1)
        try:
            snap = eng.latency_model()
            assert sorted(snap["exits"]) == ["0", "1", "2"] and snap["exits"]["0"]["samples"] > 0
        finally:
            await eng.close()

    asyncio.run(go())


class ProtocolOnlyEngine:
    """Exactly the `Engine` protocol: writes "héllo" (bytes of the byte tokenizer) at whatever exit."""

    TEXT = "héllo"

    def __init__(self):
        self.tokenizer = ByteTokenizer()
        self.info = FamilyInfo("proto", [ExitInfo(0, 1, "device", 3.0), ExitInfo(1, 2, "edge", 2.0)],
                               ["device", "edge"], 64)
        self.calls: list[str] = []
        self.requests = []

    async def start(self) -> None:
        self.calls.append("start")

    async def close(self) -> None:
        self.calls.append("close")

    async def generate(self, request):
        self.requests.append(request)
        ids = self.tokenizer.encode(self.TEXT)[:request.max_tokens]
        g = 1 if request.exit is None else request.exit
        for k, t in enumerate(ids):
            yield TokenOutput(t, g, self.info.exits[g].tier, {"edge": 1.0},
                              finish_reason="length" if k == len(ids) - 1 else None)

    async def abort(self, request_id: str) -> None:
        pass

    async def check_health(self) -> dict[str, bool]:
        return {"device": True, "edge": True}

    def exit_on_tier(self, tier: str) -> int | None:
        return {"device": 0, "edge": 1}.get(tier)

    def latency_model(self) -> dict:
        return {"exits": {}, "safety": 1.0}


def test_the_http_face_needs_only_the_engine_protocol():
    eng: Engine = ProtocolOnlyEngine()
    with ServerThread(build_app(eng)) as s:
        assert eng.calls == ["start"]
        _exercise(s, eng)
    assert eng.calls == ["start", "close"]


def _exercise(s, eng):
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 16, "exit": "device"}).json()
    assert r["choices"][0]["text"] == "héllo" and set(r["choices"][0]["familial"]["tiers"]) == {"device"}
    assert eng.requests[-1].exit == 0
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "exit": "cloud"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "exit"
    with httpx.stream("POST", s.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True, "exit": "edge"}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == "héllo"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and eng.requests[-1].exit == 1
    card = httpx.get(s.url + "/v1/models").json()["data"][0]
    assert card["latency_model"] == {"exits": {}, "safety": 1.0} and card["tiers"] == ["device", "edge"]
    assert httpx.get(s.url + "/health").json()["status"] == "ok"
