"""Exit adaptation: train only the exit heads of a family whose trunk is already trained (an imported
pretrained model), as LayerSkip and EE-LLM do.

`init` (`--init FAMILY_DIR`) starts from that checkpoint's architecture and weights. `train="exits"`
(`--train exits`) freezes the trunk -- embedding, trunk layers, final norm and LM head -- so only the
shallow heads learn: branch layers, norms, adapters and own unembeddings (a head tied to the final LM
head uses it frozen). The optimizer only sees trainable parameters, so AdamW state is sized to the
heads, and frozen trunk activations are not kept for backward. Optional distillation (`distill` = a)
pulls each shallow exit g toward the final exit at temperature T:

    L_g = (1 - a) * CE_g + a * T^2 * KL( softmax(z_final / T) || softmax(z_g / T) )

(the T^2 keeps gradient scale across T, Hinton et al. 2015); the final exit's CE stays in the
objective, a constant under a frozen trunk, so the reported loss keeps its meaning. The trainer loop,
data, checkpoints and the run record are `trunk/train.py`'s; this file adds the freezing, the loss and
the before/after validation losses it records.

Legend: B batch, T positions, D d_model, V vocab, N = B*T rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from trunk.config import ConfigError, FamilyConfig
from trunk.loss import IGNORE_INDEX, exit_weights

TRAIN_MODES = ("all", "exits")


class AdaptError(ValueError):
    """An adaptation setup that cannot run; one line naming the flag or file."""


def init_config(path) -> FamilyConfig:
    """The architecture of the checkpoint `--init` names."""
    from trunk.checkpoint import read_meta

    meta = read_meta(path)
    try:
        return FamilyConfig.from_dict(meta["architecture"])
    except (ConfigError, KeyError, TypeError) as e:
        raise AdaptError(f"{path}: bad architecture in family.json ({e})") from None


def load_init(cfg: FamilyConfig, path, data_tokenizer: dict):
    """(model with the checkpoint's weights in fp32, its tokenizer). The model is built on the meta
    device and takes the stored tensors (no random init of a billion parameters first); the data must
    be tokenized with the checkpoint's tokenizer (`data_tokenizer`: the data index's tokenizer entry)."""
    from safetensors.torch import load_file

    from trunk.checkpoint import WEIGHTS, read_meta
    from trunk.hf import build_model
    from trunk.tokenizer import load_tokenizer

    meta = read_meta(path)
    if meta["architecture"] != cfg.to_dict():
        raise AdaptError(f"{path}: architecture differs from the model being trained")
    ours = (meta["tokenizer"]["type"], meta["tokenizer"]["vocab_size"])
    theirs = (data_tokenizer.get("type"), data_tokenizer.get("vocab_size", ours[1]))
    if ours != theirs:
        raise AdaptError(f"the data was tokenized with a {theirs[0]} tokenizer, {path} uses {ours[0]} (vocab "
                         f"{ours[1]}); run `familial-train prepare ... --tokenizer {path}`")
    try:
        tensors = load_file(str(Path(path) / WEIGHTS))
    except Exception as e:  # safetensors raises its own types
        raise AdaptError(f"{Path(path) / WEIGHTS}: unreadable ({e})") from None
    return build_model(cfg, tensors, path, torch.float32), load_tokenizer(path)


def set_trainable(model, mode: str) -> dict:
    """Freeze according to `mode`; returns the counts the run record keeps."""
    if mode not in TRAIN_MODES:
        raise AdaptError(f"train must be one of {', '.join(TRAIN_MODES)}, got {mode!r}")
    if mode == "exits":
        if model.cfg.G == 1:
            raise AdaptError("train=exits needs shallow exits; this family has only the final one")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("heads."))
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if trainable == 0:
        raise AdaptError("nothing to train: the shallow heads have no parameters of their own")
    return {"train": mode, "trainable_params": trainable,
            "frozen_params": sum(p.numel() for p in params if not p.requires_grad)}


def distill_loss(model, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, weights, alpha: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, per-exit CE (G,) detached) with each shallow exit's CE blended with its KL to the
    final exit (module docstring). For a frozen trunk only: the final exit gets no gradient."""
    G = model.cfg.G
    w = exit_weights(G, weights)
    feats = model.features(tokens_BT)  # G x (B, T, D)
    targets_N = targets_BT.reshape(-1)
    mask_N = targets_N != IGNORE_INDEX
    with torch.no_grad():
        zf_NV = _logits(model, G - 1, feats[-1])
        ce_final = F.cross_entropy(zf_NV, targets_N, ignore_index=IGNORE_INDEX)
        logp_t_NV = F.log_softmax(zf_NV[mask_N] / temperature, dim=-1)  # teacher
        p_t_NV = logp_t_NV.exp()
        del zf_NV
    loss, ces = w[-1] * ce_final, []
    for g in range(G - 1):
        z_NV = _logits(model, g, feats[g])
        ce_g = F.cross_entropy(z_NV, targets_N, ignore_index=IGNORE_INDEX)
        logp_s_NV = F.log_softmax(z_NV[mask_N] / temperature, dim=-1)
        kl_g = (p_t_NV * (logp_t_NV - logp_s_NV)).sum(-1).mean()
        loss = loss + w[g] * ((1 - alpha) * ce_g + alpha * temperature ** 2 * kl_g)
        ces.append(ce_g.detach())
    return loss, torch.stack(ces + [ce_final])


def _logits(model, g: int, x_BTD: torch.Tensor) -> torch.Tensor:
    return F.linear(x_BTD.reshape(-1, x_BTD.shape[-1]), model.unembed_weight(g)).float()  # (N, V)


class DistillLoss(torch.nn.Module):
    """`distill_loss` as a module's forward, so DDP's hooks see it (as train.py's FamilyLossModule)."""

    def __init__(self, model, weights, alpha: float, temperature: float):
        super().__init__()
        if not 0 < alpha <= 1 or temperature <= 0:
            raise AdaptError(f"distill must lie in (0, 1] and distill_temp be positive, got {alpha}, {temperature}")
        if any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("heads.")):
            raise AdaptError("distill needs train=exits: the final exit is the frozen teacher")
        self.model, self.weights, self.alpha, self.temperature = model, weights, alpha, temperature

    def forward(self, tokens_BT, targets_BT):
        return distill_loss(self.model, tokens_BT, targets_BT, self.weights, self.alpha, self.temperature)


def record_start(t, adaptation: dict, out: Path, start: int, main: bool, evaluate) -> dict:
    """Run-record fields of an adaptation run: the per-exit validation loss before its first step
    (`evaluate()` at step 0, kept in metrics.jsonl so a resumed run still has it) and the setup."""
    if not t.init and t.train == "all":
        return {}
    before = losses_before(out) if start else evaluate()
    if main and not start:
        with open(Path(out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 0, "exit_val_loss": before}) + "\n")
    return {"exit_val_loss_before": before,
            "adaptation": {**adaptation, "init": t.init, "distill": t.distill, "distill_temp": t.distill_temp}}


def losses_before(out: Path) -> list[float] | None:
    """The step-0 validation losses a run wrote to metrics.jsonl (so a resumed run still reports them)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step") == 0 and "exit_val_loss" in rec:
            return rec["exit_val_loss"]
    return None
