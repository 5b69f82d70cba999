"""TeleAI's AI-Flow-Ruyi checkpoints (`RuyiQwen2ForCausalLM`, model_type "ruyi_qwen2") as families.

Ruyi's layout, read from its public modeling code (github.com/TeleAI-AI-Flow/AI-Flow-Ruyi,
`ruyi/model/ruyi_qwen2/{configuration,modeling}_ruyi_qwen2.py`): a Qwen2 trunk `model.layers.{n}`
(q/k/v biases) and config keys `early_exit_points` p_0 < ... < p_{E-1} = num_hidden_layers - 1 and
`shared_heads`. Exit i < E-1 runs `layers[:p_i]`, then its own decoder layer `model.eelayers.{i}`, its
norm `model.norms.{i}` and its head `lm_head.{i}.weight` (or the one `lm_head.weight` when
`shared_heads`); the last exit runs all layers, `model.norms.{E-1}` and the last head. In our terms
exit i is a shallow exit at layer p_i with `branch_layers=1`, `norms.{E-1}` is the final norm, and
the heads are `exit_unembed="own"` (or "tied" to the final head when shared). The selected exit
(`default_early_exit_point`, a global in Ruyi's code) is a serving choice here, so it is ignored.
This file maps names and config keys only; loading and checks are `trunk/hf.py`'s.
"""
from __future__ import annotations

import torch

from trunk.config import FamilyConfig
from trunk.hf import HFImportError, config_from_hf


# tensor names inside one Qwen2 decoder layer
_BLOCK = ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
          "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.o_proj.weight",
          *(f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")))


def exit_points(hf: dict) -> list[int]:
    L = hf["num_hidden_layers"]
    pts = hf.get("early_exit_points")
    if not isinstance(pts, list) or not pts or not all(isinstance(p, int) for p in pts):
        raise HFImportError(f"config.json: early_exit_points = {pts!r} must be a list of layer indices")
    if any(a >= b for a, b in zip(pts, pts[1:])) or pts[-1] != L - 1 or pts[0] < 1:
        raise HFImportError(f"config.json: early_exit_points = {pts} must increase from >= 1 and end at "
                            f"num_hidden_layers - 1 = {L - 1}")
    return pts


def family_layout(hf: dict, exit_layers=(), **family_kw) -> tuple[FamilyConfig, dict[str, str]]:
    """(FamilyConfig, {our tensor name: Ruyi tensor name}). `exit_layers` picks a subset of Ruyi's
    shallow exits (by layer p_i); empty keeps them all."""
    pts = exit_points(hf)
    shallow = pts[:-1]
    keep = list(exit_layers) or shallow
    unknown = sorted(set(keep) - set(shallow))
    if unknown:
        raise HFImportError(f"exit layers {unknown} are not among this Ruyi model's early_exit_points {shallow}")
    shared = bool(hf.get("shared_heads", False))
    if hf.get("tie_word_embeddings") and not shared:
        raise HFImportError("config.json: tie_word_embeddings = true is not supported with shared_heads = false")
    for k in ("branch_layers", "exit_unembed", "adapter_rank"):
        if k in family_kw:
            raise HFImportError(f"a Ruyi model fixes {k} (one branch layer, Ruyi's own heads, no adapter)")
    cfg = config_from_hf(hf, tuple(sorted(keep)), kind="qwen2", branch_layers=1,
                         exit_unembed="tied" if shared else "own", **family_kw)
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": f"model.norms.{len(pts) - 1}.weight"}
    for n in range(cfg.n_layers):
        names.update({f"layers.{n}.{s}": f"model.layers.{n}.{s}" for s in _BLOCK})
    for g, p in enumerate(cfg.exit_layers):
        i = pts.index(p)
        names.update({f"heads.{g}.branch.0.{s}": f"model.eelayers.{i}.{s}" for s in _BLOCK})
        names[f"heads.{g}.norm.weight"] = f"model.norms.{i}.weight"
        if not shared:
            names[f"heads.{g}.unembed.weight"] = f"lm_head.{i}.weight"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight" if shared else f"lm_head.{len(pts) - 1}.weight"
    return cfg, names


def rename(raw: dict[str, torch.Tensor], names: dict[str, str], source) -> dict[str, torch.Tensor]:
    """Ruyi's tensors under our names; every mapped name must exist. Exits not selected and unknown
    tensors are left out (`hf.build_model` then checks the set against the architecture)."""
    missing = sorted(v for v in names.values() if v not in raw)
    if missing:
        raise HFImportError(f"{source}: Ruyi tensor {missing[0]} not found ({len(missing)} missing)")
    expected = set(names.values())
    known = ("model.layers.", "model.eelayers.", "model.norms.", "lm_head", "model.embed_tokens.")
    foreign = sorted(k for k in raw if k not in expected and not k.startswith(known))
    if foreign:
        raise HFImportError(f"{source}: tensor {foreign[0]} is not part of Ruyi's layout")
    return {ours: raw[theirs] for ours, theirs in names.items()}
