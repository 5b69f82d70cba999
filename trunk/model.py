"""The familial model: a Llama/Qwen2-style decoder trunk with G exit heads.

This file holds only the math. Splitting into stage shards, ONNX export and serving transform a built
model from outside (`deploy/`, `relay/`); Hugging Face name mapping lives in `trunk/hf.py`, the loss
in `trunk/loss.py`, attention dispatch in `trunk/attention.py`.

Two ways in:
- training: `forward(tokens_BT)` -> one logits tensor per exit, or `exit_features` for a fused loss;
- serving a stage: `embed`, `run_layers(h, start, stop, pos, cache)` and `exit_features(g, h, pos,
  cache)` run any layer range from a hidden state with a KV cache.

Legend: B batch, T positions, D d_model, H query heads, K kv heads, E head dim, F d_ff, V vocab,
R adapter rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trunk.attention import attend
from trunk.config import FamilyConfig
from trunk.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = w * x / sqrt(mean(x^2) + eps), the reduction in fp32 (as HF Llama/Qwen2 do)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_pos, E), HF layout: frequencies repeated for the two halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(max_pos, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (max_pos, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, E)
    return emb.cos(), emb.sin()


def apply_rope(x_BHTE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    # rotate_half: (x1, x2) -> (-x2, x1) over the two halves of E
    x1, x2 = x_BHTE.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return x_BHTE * cos_TE + rot * sin_TE


class Attention(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD, cos_TE, sin_TE, start: int, kv=None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTE = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q_BHTE = apply_rope(q_BHTE, cos_TE, sin_TE)
        k_BKTE = apply_rope(k_BKTE, cos_TE, sin_TE)
        if kv is not None:
            k_BKSE, v_BKSE = kv.append(k_BKTE, v_BKTE, start)
        else:
            k_BKSE, v_BKSE = k_BKTE, v_BKTE
        y_BHTE = attend(q_BHTE, k_BKSE, v_BKSE, start)
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x_BTD):
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h_BTD, cos_TE, sin_TE, start: int, kv=None):
        h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), cos_TE, sin_TE, start, kv)
        return h_BTD + self.mlp(self.post_attention_layernorm(h_BTD))


class Adapter(nn.Module):
    """Low-rank residual adapter: x + up(down(x)); `up` starts at zero so a new adapter is the identity."""

    def __init__(self, d: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)  # (R, D)
        self.up = nn.Linear(rank, d, bias=False)    # (D, R)

    def forward(self, x_BTD):
        return x_BTD + self.up(self.down(x_BTD))


class ExitHead(nn.Module):
    """Shallow exit g: k branch decoder layers, RMSNorm, optional adapter, (own or tied) unembedding."""

    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.branch = nn.ModuleList(Block(cfg) for _ in range(cfg.branch_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.adapter = Adapter(cfg.d_model, cfg.adapter_rank) if cfg.adapter_rank else None
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if cfg.exit_unembed == "own" else None


class FamilyModel(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.heads = nn.ModuleList(ExitHead(cfg) for _ in cfg.exit_layers)  # shallow exits 0..G-2
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)                       # final exit G-1
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ---- init ----------------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2/Llama init: N(0, 0.02); residual output projections scaled by 1/sqrt(2L)."""
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") or "layernorm" in name else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif name.endswith("adapter.up.weight"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    # ---- weights -------------------------------------------------------------------------------
    def unembed_weight(self, g: int) -> torch.Tensor:
        """(V, D) unembedding of exit g (g = G-1 is the final head)."""
        final = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if g == self.cfg.G - 1 or self.heads[g].unembed is None:
            return final
        return self.heads[g].unembed.weight

    def _rope(self, start: int, T: int):
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start + T} exceed max_seq_len {self.cfg.max_seq_len}")
        return self.rope_cos[start:start + T], self.rope_sin[start:start + T]

    # ---- stage pieces (serving) ----------------------------------------------------------------
    def embed_tokens(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens_BT)

    def run_layers(self, h_BTD, start_layer: int, stop_layer: int, pos: int = 0,
                   cache: KVCache | None = None) -> torch.Tensor:
        """Trunk layers [start_layer, stop_layer) on hidden states at positions [pos, pos+T)."""
        cos, sin = self._rope(pos, h_BTD.shape[1])
        for i in range(start_layer, stop_layer):
            kv = cache.layer(f"layers.{i}") if cache is not None else None
            h_BTD = self.layers[i](h_BTD, cos, sin, pos, kv)
        return h_BTD

    def exit_features(self, g: int, h_BTD, pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Exit g's input to the unembedding: branch layers, norm, adapter. h is the trunk state at exits[g].

        With a cache, call this for every chunk of positions that reaches exits[g] (not only for
        positions that exit there): the branch layers' KV must cover every earlier position.
        """
        if g == self.cfg.G - 1:
            return self.norm(h_BTD)
        head = self.heads[g]
        if len(head.branch):
            cos, sin = self._rope(pos, h_BTD.shape[1])
            for j, blk in enumerate(head.branch):
                kv = cache.layer(f"heads.{g}.branch.{j}") if cache is not None else None
                h_BTD = blk(h_BTD, cos, sin, pos, kv)
        x_BTD = head.norm(h_BTD)
        return head.adapter(x_BTD) if head.adapter is not None else x_BTD

    def exit_logits(self, g: int, h_BTD, pos: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        return F.linear(self.exit_features(g, h_BTD, pos, cache), self.unembed_weight(g))  # (B, T, V)

    # ---- training ------------------------------------------------------------------------------
    def features(self, tokens_BT: torch.Tensor, exits=None) -> list[torch.Tensor]:
        """Pre-unembedding features for the requested exits (default all), shallow to deep."""
        want = sorted(range(self.cfg.G) if exits is None else set(exits))
        if not want or want[0] < 0 or want[-1] >= self.cfg.G:
            raise ValueError(f"exits {want} out of range for G={self.cfg.G}")
        cos, sin = self._rope(0, tokens_BT.shape[1])
        h_BTD = self.embed(tokens_BT)
        out, layer = [], 0
        for g in want:
            depth = self.cfg.exits[g]
            for i in range(layer, depth):
                h_BTD = self.layers[i](h_BTD, cos, sin, 0)
            layer = depth
            out.append(self.exit_features(g, h_BTD))
        return out

    def forward(self, tokens_BT: torch.Tensor, exits=None) -> list[torch.Tensor]:
        """Logits (B, T, V) for each requested exit (default all), shallow to deep."""
        want = sorted(range(self.cfg.G) if exits is None else set(exits))
        feats = self.features(tokens_BT, want)
        return [F.linear(x, self.unembed_weight(g)) for g, x in zip(want, feats)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
