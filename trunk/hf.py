"""Hugging Face interop: a local Llama / Qwen2 / Mistral checkpoint (or TeleAI's Ruyi, `trunk/ruyi.py`)
becomes a family, and a family goes back to Hugging Face directories.

Import reads `config.json` and the safetensors weights (one file, or shards listed by
`model.safetensors.index.json`) from a local directory, never a hub; the model's own tokenizer files
travel with it (`trunk/tokenizer.py` HFTokenizer). Features the trunk does not compute (RoPE scaling,
sliding-window attention, o_proj or MLP biases, activations other than SiLU, quantized weights) are
refused in one line naming the config key. New shallow exit heads start from the final head: a copy
of the final norm, the unembedding (tied, or copied when exits own theirs), and branch layers copied
from the trunk layers that follow the exit (as TeleAI initialised Ruyi's), so every exit is usable
before any adaptation. Export writes the trunk, and each shallow exit without an adapter, as its own
`LlamaForCausalLM` / `Qwen2ForCausalLM` directory (exit g = trunk layers [0, l_g) + its branch
layers + its norm + its unembedding). Numerics match `transformers` (RMSNorm in fp32, rotate-half RoPE).
This file maps names and configs; the math is `trunk/model.py`'s.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from trunk.checkpoint import DTYPES
from trunk.config import FamilyConfig
from trunk.model import FamilyModel, rope_tables

WEIGHTS_INDEX = "model.safetensors.index.json"
_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}


class HFImportError(ValueError):
    pass


class HFExportError(ValueError):
    pass


# ---- config ----------------------------------------------------------------------------------------

def read_hf_config(d: Path) -> dict:
    path = Path(d) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{path}: not found")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise HFImportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise HFImportError(f"{path}: not a JSON object")
    return cfg


def is_ruyi(hf: dict) -> bool:
    """TeleAI's AI-Flow-Ruyi layout (`RuyiQwen2ForCausalLM`)."""
    return (hf.get("model_type") == "ruyi_qwen2" or "RuyiQwen2ForCausalLM" in (hf.get("architectures") or [])
            or "early_exit_points" in hf)


def hf_kind(hf: dict) -> str:
    arch = (hf.get("architectures") or [None])[0]
    kind = _ARCHS.get(arch) or {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}.get(hf.get("model_type"))
    if kind is None:
        raise HFImportError(f"config.json: architectures = {arch or hf.get('model_type')!r} is not supported; "
                            f"supported: {', '.join(_ARCHS)}, RuyiQwen2ForCausalLM")
    return kind


def check_supported(hf: dict, kind: str) -> None:
    """One HFImportError naming the first config key whose feature the trunk does not compute."""
    def refuse(key: str, value, why: str):
        raise HFImportError(f"config.json: {key} = {json.dumps(value)} is not supported ({why})")

    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
            refuse(f"{key}.rope_type", rope.get("rope_type", rope.get("type")), "only default RoPE")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "SwiGLU with SiLU only")
    if hf.get("quantization_config"):
        refuse("quantization_config.quant_method", hf["quantization_config"].get("quant_method"),
               "quantized weights; import the unquantized checkpoint")
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window", True, "full attention only")
    window = hf.get("sliding_window")
    if kind == "mistral" and window is not None and window < hf.get("max_position_embeddings", 0):
        refuse("sliding_window", window, "full attention only: null or >= max_position_embeddings")
    layer_types = set(hf.get("layer_types") or ()) - {"full_attention"}
    if layer_types:
        refuse("layer_types", sorted(layer_types), "full attention only")
    if kind != "qwen2" and hf.get("attention_bias"):
        refuse("attention_bias", True, "it adds an o_proj bias the trunk does not have")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", True, "the trunk's MLP has no biases")


def config_from_hf(hf: dict, exit_layers=(), kind: str | None = None, **family_kw) -> FamilyConfig:
    kind = kind or hf_kind(hf)
    check_supported(hf, kind)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    H = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // H
    return FamilyConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=H, n_kv_heads=hf.get("num_key_value_heads") or H, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=kind == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), exit_layers=tuple(exit_layers),
        head_dim_override=0 if head_dim * H == hf["hidden_size"] else head_dim, **family_kw)


# ---- tensors -------------------------------------------------------------------------------------

def weight_files(d: Path) -> list[Path]:
    index = d / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise HFImportError(f"{index}: not a safetensors index ({e})") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise HFImportError(f"{d / missing[0]}: listed in {WEIGHTS_INDEX} but not found")
        return [d / n for n in names]
    files = sorted(d.glob("model*.safetensors"))
    if not files:
        bins = sorted(d.glob("pytorch_model*.bin"))
        hint = f" (found {bins[0].name}: only safetensors are read)" if bins else ""
        raise HFImportError(f"{d}: no model*.safetensors files{hint}")
    return files


def read_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out = {}
    for f in weight_files(d):
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise HFImportError(f"{f}: not a readable safetensors file ({e})") from None
    return {k: v for k, v in out.items() if not k.endswith("rotary_emb.inv_freq")}


def _hf_to_ours(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    return "embed.weight" if name == "embed_tokens.weight" else name


def _ours_to_hf(name: str) -> str:
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    return name if name == "lm_head.weight" else "model." + name


def init_new_heads(cfg: FamilyConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Heads a plain Llama/Qwen2 lacks start from the final head (see the module docstring)."""
    final_unembed = tensors.get("lm_head.weight", tensors["embed.weight"])
    for g, layer in enumerate(cfg.exit_layers):
        tensors[f"heads.{g}.norm.weight"] = tensors["norm.weight"].clone()
        if cfg.exit_unembed == "own":
            tensors[f"heads.{g}.unembed.weight"] = final_unembed.clone()
        for j in range(cfg.branch_layers):
            src = f"layers.{min(layer + j, cfg.n_layers - 1)}."
            for k in [k for k in tensors if k.startswith(src)]:
                tensors[f"heads.{g}.branch.{j}." + k[len(src):]] = tensors[k].clone()
        if cfg.adapter_rank:  # an identity adapter: down random, up zero
            torch.manual_seed(g)
            tensors[f"heads.{g}.adapter.down.weight"] = torch.randn(cfg.adapter_rank, cfg.d_model) * 0.02
            tensors[f"heads.{g}.adapter.up.weight"] = torch.zeros(cfg.d_model, cfg.adapter_rank)


def build_model(cfg: FamilyConfig, tensors: dict[str, torch.Tensor], source, dtype: torch.dtype) -> FamilyModel:
    """A FamilyModel holding exactly `tensors` (our names), cast to `dtype`, without a second copy in fp32."""
    with torch.device("meta"):
        model = FamilyModel(cfg)
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise HFImportError(f"{source}: tensor names do not match a {cfg.n_layers}-layer model "
                            f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for k, ref in want.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise HFImportError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, config implies {tuple(ref.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(dtype), sin.to(dtype)  # non-persistent: made here, as .to(dtype) would
    return model


def family_config(hf: dict, exit_layers=(), fmt: str = "auto", **family_kw) -> tuple[FamilyConfig, dict | None]:
    """(FamilyConfig, Ruyi's {our name: its name} or None for a plain Llama/Qwen2/Mistral), checking
    every config key before any weight is read."""
    if fmt not in ("auto", "hf", "ruyi"):
        raise HFImportError(f"format must be auto, hf or ruyi, got {fmt!r}")
    if fmt == "ruyi" or (fmt == "auto" and is_ruyi(hf)):
        from trunk import ruyi

        return ruyi.family_layout(hf, exit_layers, **family_kw)
    return config_from_hf(hf, exit_layers, **family_kw), None


def load_hf(hf_dir, exit_layers=(), dtype: torch.dtype = torch.float32, fmt: str = "auto",
            **family_kw) -> FamilyModel:
    """A FamilyModel from a local HF directory: Llama/Qwen2/Mistral with new exits at `exit_layers`, or
    Ruyi (`fmt="ruyi"` or detected) with its own exits (a subset when `exit_layers` is given)."""
    d = Path(hf_dir)
    hf = read_hf_config(d)
    cfg, ruyi_names = family_config(hf, exit_layers, fmt, **family_kw)
    if ruyi_names is not None:
        from trunk import ruyi

        tensors = ruyi.rename(read_tensors(d), ruyi_names, d)
    else:
        tensors = {_hf_to_ours(k): v for k, v in read_tensors(d).items()}
        if cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        if "norm.weight" not in tensors or "embed.weight" not in tensors:
            raise HFImportError(f"{d}: no model.embed_tokens.weight / model.norm.weight: not a {hf_kind(hf)} checkpoint")
        init_new_heads(cfg, tensors)
    return build_model(cfg, tensors, d, dtype).eval()


# ---- import into a family directory ------------------------------------------------------------------

def import_hf(hf_dir, out_dir, exit_layers=(), *, fmt: str = "auto", save_dtype: str = "auto",
              **family_kw) -> dict:
    """HF directory -> family checkpoint (weights, family.json, the model's own tokenizer files)."""
    from trunk.checkpoint import save_checkpoint
    from trunk.tokenizer import HFTokenizer, TokenizerError

    d = Path(hf_dir)
    hf = read_hf_config(d)
    _, ruyi_names = family_config(hf, exit_layers, fmt, **family_kw)  # config errors before file errors
    if save_dtype == "auto":
        save_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        save_dtype = save_dtype if save_dtype in DTYPES else "float32"
    if save_dtype not in DTYPES:
        raise HFImportError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {save_dtype!r}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (d / name).is_file():
            raise HFImportError(f"{d / name}: not found (the model's own tokenizer files are imported with it)")
    try:
        tok = HFTokenizer.load(d)
    except TokenizerError as e:
        raise HFImportError(str(e)) from None
    model = load_hf(d, exit_layers, dtype=DTYPES[save_dtype], fmt=fmt, **family_kw)
    if tok.vocab_size > model.cfg.vocab_size:
        raise HFImportError(f"{d}: tokenizer has {tok.vocab_size} tokens, the model's vocab_size is "
                            f"{model.cfg.vocab_size}")
    source = {"dir": str(d.resolve()), "architecture": (hf.get("architectures") or [hf.get("model_type")])[0],
              "format": "hf" if ruyi_names is None else "ruyi"}
    save_checkpoint(out_dir, model, tok, dtype=save_dtype, extra={"source": source})
    return {"out": str(out_dir), "config": model.cfg, "source": source, "dtype": save_dtype,
            "params": sum(p.numel() for p in model.parameters())}


# ---- export ---------------------------------------------------------------------------------------

def exit_state_dict(model: FamilyModel, g: int) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Exit g as a plain decoder in HF names: (tensors, number of layers, unembedding tied to embedding)."""
    cfg = model.cfg
    if g < cfg.G - 1 and cfg.adapter_rank:
        raise HFExportError(f"exit {g} has an adapter, which no Hugging Face decoder has")
    sd = model.state_dict()
    depth = cfg.exits[g]
    out = {_ours_to_hf(k): v for k, v in sd.items() if k == "embed.weight"
           or (k.startswith("layers.") and int(k.split(".")[1]) < depth)}
    n = depth
    if g < cfg.G - 1:
        for j in range(cfg.branch_layers):
            pre = f"heads.{g}.branch.{j}."
            out.update({f"model.layers.{depth + j}." + k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})
        n += cfg.branch_layers
        out["model.norm.weight"] = sd[f"heads.{g}.norm.weight"]
    else:
        out["model.norm.weight"] = sd["norm.weight"]
    unembed = model.unembed_weight(g)
    tied = unembed.data_ptr() == model.embed.weight.data_ptr()
    if not tied:
        out["lm_head.weight"] = unembed
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}, n, tied


def hf_config_dict(cfg: FamilyConfig, arch: str, n_layers: int, tied: bool, dtype: torch.dtype) -> dict:
    hf = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.d_ff, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": tied, "hidden_act": "silu",
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if arch == "llama":
        hf["attention_bias"] = False
    return hf


def _check_arch(cfg: FamilyConfig, arch: str) -> str:
    if arch == "auto":
        return "qwen2" if cfg.qkv_bias else "llama"
    if arch not in ("llama", "qwen2"):
        raise HFExportError(f"arch must be 'auto', 'llama' or 'qwen2', got {arch!r}")
    if arch == "qwen2" and not cfg.qkv_bias:
        raise HFExportError("Qwen2 needs q/k/v biases; export this family as 'llama'")
    if arch == "llama" and cfg.qkv_bias:
        raise HFExportError("this family has q/k/v biases, which Llama does not; export it as 'qwen2'")
    return arch


def save_hf(model: FamilyModel, out_dir, arch: str = "auto", exit: int | None = None) -> Path:
    """Write exit `exit` (default: the final one, i.e. the trunk) as a Hugging Face directory."""
    from safetensors.torch import save_file

    cfg = model.cfg
    arch = _check_arch(cfg, arch)
    g = cfg.G - 1 if exit is None else exit
    tensors, n_layers, tied = exit_state_dict(model, g)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(d / "model.safetensors.tmp", d / "model.safetensors")
    dtype = next(model.parameters()).dtype
    (d / "config.json").write_text(json.dumps(hf_config_dict(cfg, arch, n_layers, tied, dtype), indent=2) + "\n")
    return d


def _save_hf_tokenizer(tok, d: Path) -> bool:
    """The family's tokenizer in a form `transformers.AutoTokenizer` loads; False for the byte tokenizer."""
    from trunk.artifacts import write_json_atomic
    from trunk.tokenizer import SPECIALS

    if tok.kind == "byte":
        return False
    tok.save(d)
    if tok.kind == "bpe":  # our tokenizer_config.json -> the Hugging Face one
        write_json_atomic(d / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
            "pad_token": SPECIALS[2]})
    if not (d / "generation_config.json").is_file():
        gen = {"eos_token_id": list(tok.eos_ids)}
        if tok.bos_id is not None:
            gen["bos_token_id"] = tok.bos_id
        write_json_atomic(d / "generation_config.json", gen)
    return True


def export_family(family_dir, out_dir, arch: str = "auto") -> list[dict]:
    """Write `final/` (the trunk) and `exit-{g}/` for every shallow exit the layout allows under
    out_dir, each a Hugging Face directory with the tokenizer; one summary dict per exit."""
    from trunk.checkpoint import load_checkpoint

    from trunk.checkpoint import read_meta

    model, tok, _ = load_checkpoint(family_dir, dtype=DTYPES.get(read_meta(family_dir).get("dtype"), torch.float32))
    cfg = model.cfg
    _check_arch(cfg, arch)
    out = []
    for g in range(cfg.G):
        name = "final" if g == cfg.G - 1 else f"exit-{g}"
        if g < cfg.G - 1 and cfg.adapter_rank:
            out.append({"exit": g, "dir": None, "skipped": "has an adapter"})
            continue
        d = save_hf(model, Path(out_dir) / name, arch, exit=g)
        has_tok = _save_hf_tokenizer(tok, d)
        n = cfg.exits[g] + (cfg.branch_layers if g < cfg.G - 1 else 0)
        out.append({"exit": g, "dir": str(d), "layers": n, "tokenizer": has_tok})
    return out
