"""Ruyi layout import: a small random model written with AI-Flow-Ruyi's exact tensor names and config
keys (from its public modeling_ruyi_qwen2.py / configuration_ruyi_qwen2.py) becomes a family whose
per-exit logits equal a reimplementation of Ruyi's own forward, written here from its modeling code."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from trunk.checkpoint import load_checkpoint
from trunk.cli import main
from trunk.hf import HFImportError, load_hf

L, D, H, KV, FF, V = 6, 48, 4, 2, 80, 403  # V covers the Qwen2-style test tokenizer (400)
POINTS = [2, 3, 5]  # early_exit_points: two shallow exits and the last layer (num_hidden_layers - 1)


def ruyi_config(shared: bool, points=POINTS) -> dict:
    """config.json as RuyiQwen2Config.save_pretrained writes it (its __init__ keys, auto_map included)."""
    return {
        "architectures": ["RuyiQwen2ForCausalLM"], "model_type": "ruyi_qwen2",
        "auto_map": {"AutoConfig": "configuration_ruyi_qwen2.RuyiQwen2Config",
                     "AutoModel": "modeling_ruyi_qwen2.RuyiQwen2Model",
                     "AutoModelForCausalLM": "modeling_ruyi_qwen2.RuyiQwen2ForCausalLM"},
        "vocab_size": V, "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": KV, "hidden_act": "silu", "max_position_embeddings": 64,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "tie_word_embeddings": False,
        "rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "attention_dropout": 0.0, "shared_heads": shared,
        "default_early_exit_point": points[-1], "early_exit_points": points, "torch_dtype": "float32",
    }


def _layer(prefix: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    E = D // H

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.08

    return {f"{prefix}.self_attn.q_proj.weight": w(H * E, D), f"{prefix}.self_attn.q_proj.bias": w(H * E),
            f"{prefix}.self_attn.k_proj.weight": w(KV * E, D), f"{prefix}.self_attn.k_proj.bias": w(KV * E),
            f"{prefix}.self_attn.v_proj.weight": w(KV * E, D), f"{prefix}.self_attn.v_proj.bias": w(KV * E),
            f"{prefix}.self_attn.o_proj.weight": w(D, H * E), f"{prefix}.mlp.gate_proj.weight": w(FF, D),
            f"{prefix}.mlp.up_proj.weight": w(FF, D), f"{prefix}.mlp.down_proj.weight": w(D, FF),
            f"{prefix}.input_layernorm.weight": 1 + w(D), f"{prefix}.post_attention_layernorm.weight": 1 + w(D)}


def ruyi_tensors(shared: bool, points=POINTS, seed: int = 0) -> dict[str, torch.Tensor]:
    """RuyiQwen2ForCausalLM's state dict names: model.{embed_tokens, layers, eelayers, norms}, lm_head."""
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(V, D, generator=g) * 0.5}
    for n in range(L):
        t.update(_layer(f"model.layers.{n}", g))
    for i in range(len(points) - 1):
        t.update(_layer(f"model.eelayers.{i}", g))
    for i in range(len(points)):
        t[f"model.norms.{i}.weight"] = 1 + torch.randn(D, generator=g) * 0.1
    heads = 1 if shared else len(points)
    for i in range(heads):
        t["lm_head.weight" if shared else f"lm_head.{i}.weight"] = torch.randn(V, D, generator=g) * 0.08
    return t


# ---- Ruyi's forward, re-derived from modeling_ruyi_qwen2.py (eager attention, no cache) ------------

def _rms(x, w, eps=1e-6):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def _decoder_layer(t, p, h, cos, sin):
    B, T, _ = h.shape
    E = D // H
    x = _rms(h, t[f"{p}.input_layernorm.weight"])
    q = F.linear(x, t[f"{p}.self_attn.q_proj.weight"], t[f"{p}.self_attn.q_proj.bias"]).view(B, T, H, E).transpose(1, 2)
    k = F.linear(x, t[f"{p}.self_attn.k_proj.weight"], t[f"{p}.self_attn.k_proj.bias"]).view(B, T, KV, E).transpose(1, 2)
    v = F.linear(x, t[f"{p}.self_attn.v_proj.weight"], t[f"{p}.self_attn.v_proj.bias"]).view(B, T, KV, E).transpose(1, 2)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # repeat_kv
    scores = q @ k.transpose(2, 3) / math.sqrt(E)
    scores = scores + torch.full((T, T), float("-inf")).triu(1)
    a = (scores.softmax(-1, dtype=torch.float32) @ v).transpose(1, 2).reshape(B, T, H * E)
    h = h + F.linear(a, t[f"{p}.self_attn.o_proj.weight"])
    x = _rms(h, t[f"{p}.post_attention_layernorm.weight"])
    return h + F.linear(F.silu(F.linear(x, t[f"{p}.mlp.gate_proj.weight"])) * F.linear(x, t[f"{p}.mlp.up_proj.weight"]),
                        t[f"{p}.mlp.down_proj.weight"])


def ruyi_forward(t, cfg: dict, tokens, early_exit_point: int):
    """RuyiQwen2ForCausalLM.forward with set_global_val("early_exit_point", p)."""
    pts = cfg["early_exit_points"]
    idx = pts.index(early_exit_point)
    E = D // H
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, E, 2, dtype=torch.int64).float() / E))
    freqs = torch.arange(tokens.shape[1]).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    h = t["model.embed_tokens.weight"][tokens]
    layers = [f"model.layers.{n}" for n in range(early_exit_point)]
    layers.append(f"model.layers.{L - 1}" if early_exit_point == L - 1 else f"model.eelayers.{idx}")
    for p in layers:  # chain(self.layers[:p], [self.layers[-1] or self.eelayers[idx]])
        h = _decoder_layer(t, p, h, cos, sin)
    h = _rms(h, t[f"model.norms.{idx}.weight"])
    head = t["lm_head.weight"] if cfg["shared_heads"] else t[f"lm_head.{idx}.weight"]
    return F.linear(h, head)


def _write(d, shared: bool, points=POINTS, seed: int = 0) -> tuple[dict, dict]:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    cfg, t = ruyi_config(shared, points), ruyi_tensors(shared, points, seed)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(t, str(d / "model.safetensors"))
    return cfg, t


@pytest.mark.parametrize("shared", [False, True])
def test_per_exit_logits_equal_ruyi_forward(tmp_path, shared):
    cfg, t = _write(tmp_path / "ruyi", shared)
    ours = load_hf(tmp_path / "ruyi")                          # detected from config.json
    c = ours.cfg
    assert c.exits == (2, 3, 6) and c.branch_layers == 1 and c.qkv_bias
    assert c.exit_unembed == ("tied" if shared else "own") and not c.tie_embeddings
    tokens = torch.randint(0, V, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(tokens)
        for g, p in enumerate(POINTS):
            want = ruyi_forward(t, cfg, tokens, p)
            # fp32 on both sides: summation order only
            assert (got[g] - want).abs().max().item() <= 1e-4, (g, p)


def test_exit_subset_and_cli_import(tmp_path):
    from tests.trunk.hf_models import save_tokenizer

    cfg, t = _write(tmp_path / "ruyi", shared=False)
    hf_tok = save_tokenizer("qwen2", tmp_path / "ruyi")
    assert len(hf_tok) <= V
    assert main(["import-hf", str(tmp_path / "ruyi"), "--exits", "3", "--out", str(tmp_path / "fam")]) == 0
    model, tok, meta = load_checkpoint(tmp_path / "fam")
    assert model.cfg.exits == (3, 6) and meta["source"]["format"] == "ruyi" and tok.kind == "hf"
    tokens = torch.randint(0, V, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(tokens)
        assert (got[0] - ruyi_forward(t, cfg, tokens, 3)).abs().max().item() <= 1e-4
        assert (got[1] - ruyi_forward(t, cfg, tokens, 5)).abs().max().item() <= 1e-4


def test_ruyi_errors_name_the_key(tmp_path, capsys):
    _write(tmp_path / "a", shared=False, points=[2, 4])       # last point is not num_hidden_layers - 1
    with pytest.raises(HFImportError, match="early_exit_points"):
        load_hf(tmp_path / "a")
    _write(tmp_path / "b", shared=False)
    with pytest.raises(HFImportError, match=r"exit layers \[4\] are not among"):
        load_hf(tmp_path / "b", exit_layers=(4,))
    with pytest.raises(HFImportError, match="fixes branch_layers"):
        load_hf(tmp_path / "b", branch_layers=2)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True}))
    assert main(["import-hf", str(tmp_path / "b"), "--out", str(tmp_path / "x")]) == 2
    assert "use_sliding_window" in capsys.readouterr().err
