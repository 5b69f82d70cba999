"""Hugging Face interop: turn a local Llama or Qwen2 safetensors checkpoint into a family, and export
a family's trunk back to the Hugging Face layout.

Import reads `config.json` and `model*.safetensors` (single file or sharded with an index) from a local
directory, never a hub. New shallow exit heads start with a copy of the final norm and the tied
unembedding, so every exit is usable before any familial training. Export writes the trunk only
(embedding, layers, final norm, LM head): exit heads have no Hugging Face counterpart.
Numerics match `transformers`' Llama/Qwen2 (RMSNorm in fp32, RoPE in the rotate-half layout).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from trunk.config import FamilyConfig
from trunk.model import FamilyModel


class HFImportError(ValueError):
    pass


_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def config_from_hf(hf: dict, exit_layers=(), **family_kw) -> FamilyConfig:
    arch = (hf.get("architectures") or [None])[0]
    kind = _ARCHS.get(arch) or {"llama": "llama", "qwen2": "qwen2"}.get(hf.get("model_type"))
    if kind is None:
        raise HFImportError(f"unsupported architecture {arch or hf.get('model_type')!r}; supported: {', '.join(_ARCHS)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise HFImportError(f"RoPE scaling {rope_type!r} is not supported (only default RoPE)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    H = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // H
    bias = True if kind == "qwen2" else bool(hf.get("attention_bias", False))
    if kind == "llama" and hf.get("mlp_bias"):
        raise HFImportError("Llama checkpoints with mlp_bias=true are not supported")
    return FamilyConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=H, n_kv_heads=hf.get("num_key_value_heads") or H, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), exit_layers=tuple(exit_layers),
        head_dim_override=0 if head_dim * H == hf["hidden_size"] else head_dim, **family_kw)


def _hf_to_ours(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    return "embed.weight" if name == "embed_tokens.weight" else name


def _ours_to_hf(name: str) -> str:
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    return name if name == "lm_head.weight" else "model." + name


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(d.glob("model*.safetensors"))
    if not files:
        raise HFImportError(f"{d}: no model*.safetensors files")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def load_hf(hf_dir, exit_layers=(), dtype: torch.dtype = torch.float32, **family_kw) -> FamilyModel:
    """Build a FamilyModel from a local HF Llama/Qwen2 directory, adding shallow exits at `exit_layers`."""
    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise HFImportError(f"{cfg_path}: not found")
    cfg = config_from_hf(json.loads(cfg_path.read_text()), exit_layers, **family_kw)
    tensors = {_hf_to_ours(k): v for k, v in _read_tensors(d).items()
               if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    model = FamilyModel(cfg)
    want = model.state_dict()
    trunk_keys = {k for k in want if not k.startswith("heads.")}
    missing = sorted(trunk_keys - set(tensors))
    extra = sorted(set(tensors) - trunk_keys)
    if missing or extra:
        raise HFImportError(f"{d}: tensor names do not match a {cfg.n_layers}-layer model "
                            f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for k in trunk_keys:
        if tuple(tensors[k].shape) != tuple(want[k].shape):
            raise HFImportError(f"{d}: {k} has shape {tuple(tensors[k].shape)}, config implies {tuple(want[k].shape)}")
    # New exits start from the final head: copy of the final norm (own unembeddings from the LM head).
    final_unembed = tensors.get("lm_head.weight", tensors["embed.weight"])
    for g in range(cfg.G - 1):
        tensors[f"heads.{g}.norm.weight"] = tensors["norm.weight"].clone()
        if cfg.exit_unembed == "own":
            tensors[f"heads.{g}.unembed.weight"] = final_unembed.clone()
    head_keys = {k for k in want if k.startswith("heads.")}
    model.load_state_dict({**{k: want[k] for k in head_keys}, **tensors}, strict=True)
    return model.to(dtype)


def save_hf(model: FamilyModel, out_dir, arch: str = "llama") -> Path:
    """Write the trunk as a Hugging Face `LlamaForCausalLM` or `Qwen2ForCausalLM` directory."""
    from safetensors.torch import save_file

    cfg = model.cfg
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    if arch == "qwen2" and not cfg.qkv_bias:
        raise ValueError("Qwen2 needs q/k/v biases; export this family as 'llama'")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    sd = {_ours_to_hf(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()
          if not k.startswith("heads.")}
    save_file(sd, str(d / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(d / "model.safetensors.tmp", d / "model.safetensors")
    hf = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_ff, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if arch == "llama":
        hf["attention_bias"] = cfg.qkv_bias
    (d / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return d
