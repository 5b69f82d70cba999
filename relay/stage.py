"""What a relay node needs from the model slice it serves: the `Stage` protocol, and two stand-ins.

A node holds one tier: trunk layers [start_layer, stop_layer) and the exit heads inside them (shard 0
also embeds tokens). `deploy.shards.load_tier` (PyTorch) and `deploy.onnx_export.OnnxTierStage` (ONNX
Runtime) implement the protocol from stage shards. `ModelStage` builds the same slice straight from an
in-memory `trunk.model.FamilyModel` (tests and experiments); `IdentityStage` computes nothing and
exists so the hop benchmark measures wire and codec cost only. Sessions, caching policy and the
network are `relay/node.py`'s business, not this file's.

Legend: B batch (1), T positions, D d_model, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trunk.config import FamilyConfig
from trunk.kv_cache import KVCache


@dataclass
class StageOut:
    """Same fields as deploy.shards.StageOut (duck-typed, so relay never depends on its identity)."""
    h_out_BTD: torch.Tensor                                              # trunk state at stop_layer
    exit_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # g -> (B, T, D) trunk state at exits[g]
    exit_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # g -> (B, T or 1, V), as asked


class Stage(Protocol):
    tier: str
    cfg: FamilyConfig
    start_layer: int
    stop_layer: int
    has_embedding: bool
    exits: list[int]          # exit indices held, shallow to deep
    deepest_exit: int
    is_last: bool

    def forward(self, x, pos: int, cache, *, logits_for=None, last_only: bool = False) -> StageOut:
        """Positions [pos, pos+T): every held exit's branch layers run (their KV must cover every
        position); exits in `logits_for` (default all held) are unembedded, only at T-1 if last_only."""
    def exit_logits(self, g: int, h_BTD: torch.Tensor, pos: int, cache) -> torch.Tensor: ...


def new_cache(stage, max_tokens: int):
    """A fresh per-session cache for `stage` (its own kind if it has one, e.g. ONNX Runtime's)."""
    make = getattr(stage, "new_cache", None)
    return make(max_tokens) if make is not None else KVCache(max_tokens)


def exit_val_losses(stage) -> dict[int, float | None]:
    """Measured validation loss per exit held, from the manifest when the stage has one."""
    manifest = getattr(stage, "manifest", None) or {}
    out = {g: None for g in stage.exits}
    for e in manifest.get("exits", []) if isinstance(manifest, dict) else []:
        if e.get("index") in out:
            out[e["index"]] = e.get("val_loss")
    extra = getattr(stage, "val_loss", None)
    if isinstance(extra, dict):
        out.update({g: v for g, v in extra.items() if g in out})
    return out


class ModelStage:
    """Exits `shards` (consecutive exit indices) of an in-memory FamilyModel, as one tier."""

    def __init__(self, model, shards: list[int], tier: str, val_loss: dict[int, float] | None = None):
        cfg = model.cfg
        assert shards == list(range(shards[0], shards[-1] + 1)) and 0 <= shards[0] and shards[-1] < cfg.G
        self.model, self.cfg, self.tier = model, cfg, tier
        self.exits = list(shards)
        self.deepest_exit = shards[-1]
        self.start_layer = 0 if shards[0] == 0 else cfg.exits[shards[0] - 1]
        self.stop_layer = cfg.exits[shards[-1]]
        self.has_embedding = shards[0] == 0
        self.is_last = shards[-1] == cfg.G - 1
        self.val_loss = dict(val_loss or {})
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def forward(self, x, pos: int, cache, *, logits_for=None, last_only: bool = False) -> StageOut:
        h_BTD = self.model.embed_tokens(x) if self.has_embedding else x.to(self.dtype)
        want = set(self.exits if logits_for is None else logits_for)
        out, layer = StageOut(h_BTD), self.start_layer
        for g in self.exits:
            h_BTD = self.model.run_layers(h_BTD, layer, self.cfg.exits[g], pos, cache)
            layer = self.cfg.exits[g]
            out.exit_hidden[g] = h_BTD
            x_BTD = self.model.exit_features(g, h_BTD, pos, cache)  # (B, T, D)
            if g in want:
                out.exit_logits[g] = torch.nn.functional.linear(x_BTD[:, -1:] if last_only else x_BTD,
                                                                self.model.unembed_weight(g))
        out.h_out_BTD = h_BTD
        return out

    @torch.inference_mode()
    def exit_logits(self, g: int, h_BTD, pos: int, cache) -> torch.Tensor:
        """(B, T, V). Not for positions `forward` already ran with this cache (it would append twice)."""
        return self.model.exit_logits(g, h_BTD, pos, cache)


class _NoCache:
    """IdentityStage's cache: only counts positions, so the node's bookkeeping still runs."""

    def __init__(self, max_tokens: int):
        self.n = 0

    def truncate(self, length: int) -> None:
        self.n = min(self.n, length)

    def nbytes(self) -> int:
        return 0


class IdentityStage:
    """Pass-through last tier of width D: returns its input and answers token 0 (hop benchmark)."""

    def __init__(self, d_model: int, tier: str = "sink", vocab: int = 8):
        self.cfg = FamilyConfig(vocab_size=vocab, d_model=d_model, n_layers=2, n_heads=1, n_kv_heads=1,
                                d_ff=8, max_seq_len=1 << 16, exit_layers=(1,),
                                head_dim_override=2)
        self.tier, self.exits, self.deepest_exit = tier, [1], 1
        self.start_layer, self.stop_layer = 1, 2
        self.has_embedding, self.is_last = False, True
        self.dtype = torch.float32

    def new_cache(self, max_tokens: int) -> Any:
        return _NoCache(max_tokens)

    def forward(self, x, pos: int, cache, *, logits_for=None, last_only: bool = False) -> StageOut:
        cache.n = pos + x.shape[1]
        want = [1] if logits_for is None else list(logits_for)
        return StageOut(x, {1: x}, {g: torch.zeros(1, 1, self.cfg.vocab_size) for g in want})

    def exit_logits(self, g: int, h_BTD, pos: int, cache) -> torch.Tensor:
        return torch.zeros(h_BTD.shape[0], h_BTD.shape[1], self.cfg.vocab_size)
