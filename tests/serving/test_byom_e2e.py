"""Bring your own model, end to end through public interfaces: a random `LlamaForCausalLM` /
`Qwen2ForCausalLM` with its own tokenizer, made here -> `familial-train import-hf` -> `familial-deploy
split` -> device, edge and cloud relay nodes on loopback -> the router's HTTP API (and a RelayEngine's
`generate`). Final-exit greedy tokens equal transformers' greedy `generate`, chat requests use the
model's template, and the Llama model's second EOS id (`<|eot_id|>`, from generation_config.json) ends
generation as it does in transformers.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from deploy.cli import main as deploy_main  # noqa: E402
from serving.app import build_app  # noqa: E402
from serving.engine import GenerateRequest, RelayEngine, SamplingParams  # noqa: E402
from serving_helpers import NodeChain, ServerThread  # noqa: E402
from tests.trunk.hf_models import write_model  # noqa: E402
from trunk.cli import main as train_main  # noqa: E402
from trunk.tokenizer import load_tokenizer  # noqa: E402

N = 12
FINAL = 2  # exits at layers 1, 2 and the final output (4 layers)
PROMPTS = ["Hello world! How are", "def fibonacci(n):"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the fox quick?"}]


def _avoid_partial_characters(hf, hf_tok) -> None:
    """Shrink the output rows of tokens that are only part of a UTF-8 character (byte-fallback <0xNN>,
    byte-level bytes >= 0x80), so the random model's text is valid UTF-8. On invalid byte runs a
    streaming decoder and a whole-sequence decode legitimately differ (HF's ByteFallback turns a whole
    invalid run into U+FFFDs, even bytes that were valid when streamed); the ids are compared anyway."""
    rows = [i for i in range(len(hf_tok)) if "\ufffd" in hf_tok.decode([i])]
    with torch.no_grad():
        hf.get_output_embeddings().weight[rows] *= 0.05


def _make_eot_likely(hf, hf_tok, directory) -> None:
    """Give `<|eot_id|>` (the second EOS) the unembedding row of the 4th greedy token, scaled by 1.05, so greedy
    decoding ends on it early: the EOS *list*, not only eos_id, must stop generation."""
    ids = hf_tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        t4 = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)[0, -1]
        eot = hf_tok.convert_tokens_to_ids("<|eot_id|>")
        hf.lm_head.weight[eot] = 1.05 * hf.lm_head.weight[t4]
    hf.save_pretrained(directory)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"byom_{kind}")
    hf, hf_tok = write_model(kind, root / "hf")
    _avoid_partial_characters(hf, hf_tok)
    hf.save_pretrained(root / "hf")
    if kind == "llama":
        _make_eot_likely(hf, hf_tok, root / "hf")
    flags = ["--branch-layers", "1", "--exit-unembed", "own"] if kind == "qwen2" else []
    assert train_main(["import-hf", str(root / "hf"), "--exits", "1,2", *flags, "--out", str(root / "fam")]) == 0
    assert deploy_main(["split", str(root / "fam"), "--out", str(root / "shards"),
                        "--tiers", "device=0,edge=1,cloud=2.."]) == 0
    with NodeChain(root / "shards") as chain:
        eng = RelayEngine(chain.head, load_tokenizer(root / "shards"), name=kind, tier_addresses=chain.addresses,
                          max_seq_len=128)
        with ServerThread(build_app(eng)) as server:
            yield kind, hf, hf_tok, chain, server, root


def _hf_greedy(hf, hf_tok, prompt_ids: list[int]) -> list[int]:
    """transformers' greedy continuation; it stops after any id of generation_config's EOS list."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=N, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def _continuation(hf_tok, prompt_ids, new_ids) -> str:
    """The text new_ids add after the prompt (as a streaming server shows it: leading space kept)."""
    full = hf_tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
    return full[len(hf_tok.decode(prompt_ids, skip_special_tokens=True)):]


def _eos(root) -> list[int]:
    return json.loads((root / "hf" / "generation_config.json").read_text())["eos_token_id"]


def _truncate_at_eos(ids, eos):
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def test_engine_greedy_tokens_equal_transformers(family):
    kind, hf, hf_tok, chain, _, root = family
    eos = _eos(root)

    async def run():
        eng = RelayEngine(chain.head, load_tokenizer(root / "shards"), max_seq_len=128)
        try:
            await eng.start(calibrate_rounds=1)
            outs = []
            for p in PROMPTS:
                req = GenerateRequest(request_id=uuid.uuid4().hex, prompt_ids=hf_tok(p).input_ids, max_tokens=N,
                                      sampling=SamplingParams(temperature=0.0), exit=FINAL)
                outs.append([o async for o in eng.generate(req)])
            return outs
        finally:
            await eng.close()

    for p, outs in zip(PROMPTS, asyncio.run(run())):
        assert {o.exit for o in outs} == {FINAL} and {o.tier for o in outs} == {"cloud"}
        ours = _truncate_at_eos([o.token_id for o in outs], eos)
        assert ours == _hf_greedy(hf, hf_tok, hf_tok(p).input_ids), p


def test_http_completions_and_eos_list(family):
    kind, hf, hf_tok, _, server, root = family
    eos = _eos(root)
    ended_on_second_eos = False
    for p in PROMPTS:
        ids = hf_tok(p).input_ids
        want = _hf_greedy(hf, hf_tok, ids)
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": p, "max_tokens": N, "temperature": 0, "exit": FINAL}).json()
        c = r["choices"][0]
        assert c["text"] == _continuation(hf_tok, ids, want), (p, c["text"])
        assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == len(want)
        assert c["finish_reason"] == ("stop" if want[-1] in eos else "length")
        ended_on_second_eos |= want[-1] == eos[1]
    if kind == "llama":  # the fixture made <|eot_id|> (not the tokenizer's eos_token) end a generation
        assert ended_on_second_eos


def test_http_chat_uses_the_template(family):
    kind, hf, hf_tok, _, server, _ = family
    ids = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    want = _continuation(hf_tok, ids, _hf_greedy(hf, hf_tok, ids))
    body = {"messages": CHAT, "max_tokens": N, "temperature": 0, "exit": FINAL}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["usage"]["prompt_tokens"] == len(ids)                      # the model's template, not ours
    assert r["choices"][0]["message"]["content"] == want
    streamed = ""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert streamed == want
    if kind == "llama":  # the template's raise_exception is a 400 in OpenAI's error shape
        bad = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "assistant", "content": "hi"}], "max_tokens": 2})
        assert bad.status_code == 400 and "must start with a user" in bad.json()["error"]["message"]
