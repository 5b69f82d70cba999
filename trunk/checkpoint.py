"""The checkpoint format: `model.safetensors` + `family.json` + tokenizer files in one directory.

family.json (format "familial/v1") carries the architecture, the exits with their measured validation
loss, the tokenizer kind, tokens and FLOPs seen, the parameter counts and the training config. Every
file is written to a temporary name and renamed, and family.json is written last, so a directory with
a family.json is complete. Loading checks that family.json is ours, that every tensor the
architecture needs is present with the right shape and dtype, and that nothing foreign is there;
any failure is one `CheckpointError` line naming the file and the problem.
Optimizer state for resuming lives in the trainer (`trunk/train.py`), not here.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from trunk.artifacts import read_json_artifact, write_json_atomic
from trunk.config import ConfigError, FamilyConfig
from trunk.flops import param_counts
from trunk.model import FamilyModel
from trunk.tokenizer import TokenizerError, load_tokenizer

FORMAT = "familial/v1"
WEIGHTS = "model.safetensors"
META = "family.json"
# dtype name (as family.json, a shard manifest and the --dtype flags write it) -> torch dtype
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    pass


def save_checkpoint(directory, model: FamilyModel, tokenizer, *, exit_val_loss=None, tokens_seen: int = 0,
                    flops_seen: float = 0.0, train_config: dict | None = None, dtype: str = "float32",
                    extra: dict | None = None, state_dict: dict | None = None) -> Path:
    """`state_dict` replaces model.state_dict() as the tensors written (a sharded model's, gathered)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = model.state_dict() if state_dict is None else state_dict
    sd = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    tmp = d / (WEIGHTS + ".tmp")
    save_file(sd, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, d / WEIGHTS)
    tokenizer.save(d)
    pc = param_counts(cfg)
    meta = {
        "format": FORMAT,
        "architecture": cfg.to_dict(),
        "dtype": dtype,
        "exits": [{"index": g, "layer": layer,
                   "val_loss": None if exit_val_loss is None else float(exit_val_loss[g])}
                  for g, layer in enumerate(cfg.exits)],
        "tokenizer": {"type": tokenizer.kind, "files": tokenizer.files(), "vocab_size": tokenizer.vocab_size},
        "tokens_seen": int(tokens_seen),
        "flops_seen": float(flops_seen),
        "params": {"non_embedding": pc.non_embedding, "embedding": pc.embedding, "total": pc.total},
        "train_config": train_config or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    write_json_atomic(d / META, meta)
    return d


def read_meta(directory) -> dict:
    return read_json_artifact(Path(directory) / META, FORMAT, CheckpointError, kind="a familial checkpoint",
                              missing_hint=f"is {directory} a familial checkpoint?")


def load_checkpoint(directory, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer, family.json dict). `dtype` overrides the stored dtype."""
    d = Path(directory)
    meta = read_meta(d)
    try:
        cfg = FamilyConfig.from_dict(meta["architecture"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d / META}: bad architecture ({e})") from None
    try:
        tokenizer = load_tokenizer(d)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    stored = DTYPES.get(meta.get("dtype", "float32"))
    if stored is None:
        raise CheckpointError(f"{d / META}: unknown dtype {meta.get('dtype')!r}")
    tensors = _read_weights(d / WEIGHTS)
    model = FamilyModel(cfg)
    _check_tensors(d / WEIGHTS, model, tensors, stored)
    model.load_state_dict(tensors, strict=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval(), tokenizer, meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({e})") from None


def _check_tensors(path: Path, model: FamilyModel, tensors: dict, dtype: torch.dtype) -> None:
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s) the architecture needs, e.g. {missing[0]}")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} tensor(s) the architecture does not have, e.g. {extra[0]}")
    for name, ref in want.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, architecture needs {tuple(ref.shape)}")
        if t.dtype != dtype:
            raise CheckpointError(f"{path}: tensor {name} is {t.dtype}, family.json says {dtype}")
