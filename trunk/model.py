"""The familial model: a Llama/Qwen2-style decoder trunk with G exit heads.

This file holds only the math. How attention reaches its keys and values is the caller's business:
every block takes an `attend(q, k, v)` callable. Training passes causal SDPA over the whole sequence
(`causal_attend`); serving passes attention over a KV pool (`trunk/stage.py`); ONNX export passes
explicit attention over past/present tensors (`deploy/onnx_export.py`). Splitting into stage shards,
export and serving transform a built model from outside; Hugging Face names live in `trunk/hf.py`,
the loss in `trunk/loss.py`.

Layer ids: trunk layer i is id i; branch layer j of exit head g is id L + g * branch_layers + j
(`FamilyConfig.layer_id`). Caches index layers by these integers, never by names.

Legend: B batch, T positions, N packed rows, D d_model, H query heads, K kv heads, E head dim,
F d_ff, V vocab, R adapter rank. Blocks accept any leading shape (..., D): (B, T, D) in training,
(N, D) when serving packed rows.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trunk.config import FamilyConfig

# attend(q (..., H, E), k (..., K, E), v (..., K, E)) -> (..., H, E): the only way a block reaches keys
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., E) rotated by cos/sin broadcast against it; rotate_half: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return x * cos + rot * sin


def causal_attend(q_BTHE: torch.Tensor, k_BTKE: torch.Tensor, v_BTKE: torch.Tensor) -> torch.Tensor:
    """Causal GQA self-attention over whole sequences (training, reference runs): SDPA."""
    y_BHTE = F.scaled_dot_product_attention(q_BTHE.transpose(1, 2), k_BTKE.transpose(1, 2),
                                            v_BTKE.transpose(1, 2), is_causal=True,
                                            enable_gqa=q_BTHE.shape[2] != k_BTKE.shape[2])
    return y_BHTE.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, attend: Attend) -> torch.Tensor:
        """x (..., D); cos/sin broadcast against (..., 1, E) (e.g. (T, 1, E) or (N, 1, E))."""
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin)  # (..., H, E)
        k = apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv, self.head_dim)), cos, sin)    # (..., K, E)
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.head_dim))                           # (..., K, E)
        return self.o_proj(attend(q, k, v).flatten(-2))


class MLP(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: FamilyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, attend: Attend):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class Adapter(nn.Module):
    """Low-rank residual adapter: x + up(down(x)); `up` starts at zero so a new adapter is the identity."""

    def __init__(self, d: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)  # (R, D)
        self.up = nn.Linear(rank, d, bias=False)    # (D, R)

    def forward(self, x):
        return x + self.up(self.down(x))


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
        # on the meta device (a structure for names and shapes: deploy, HF import) nothing is initialised:
        # torch's meta kernels for normal_ and the RoPE arithmetic import torch._dynamo (~1 s of a node's start)
        meta = torch.empty(0).is_meta
        self.embed = (nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
                      if meta else nn.Embedding(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.heads = nn.ModuleList(ExitHead(cfg) for _ in cfg.exit_layers)  # shallow exits 0..G-2
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)                       # final exit G-1
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = ((torch.empty(cfg.max_seq_len, cfg.head_dim),) * 2 if meta
                    else rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not meta:
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

    def branch_blocks(self, g: int) -> list[tuple[int, Block]]:
        """(layer id, block) of exit g's branch layers; none for the final exit."""
        if g == self.cfg.G - 1:
            return []
        return [(self.cfg.layer_id(g, j), blk) for j, blk in enumerate(self.heads[g].branch)]

    def head_features(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """Exit g's input to the unembedding from the (branch-layer) output x: norm, adapter."""
        if g == self.cfg.G - 1:
            return self.norm(x)
        head = self.heads[g]
        x = head.norm(x)
        return head.adapter(x) if head.adapter is not None else x

    # ---- training ------------------------------------------------------------------------------
    def features(self, tokens_BT: torch.Tensor, exits=None) -> list[torch.Tensor]:
        """Pre-unembedding features (B, T, D) for the requested exits (default all), shallow to deep."""
        want = sorted(range(self.cfg.G) if exits is None else set(exits))
        if not want or want[0] < 0 or want[-1] >= self.cfg.G:
            raise ValueError(f"exits {want} out of range for G={self.cfg.G}")
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {T} exceed max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]  # (T, 1, E)
        h_BTD = self.embed(tokens_BT)
        out, layer = [], 0
        for g in want:
            for i in range(layer, self.cfg.exits[g]):
                h_BTD = self.layers[i](h_BTD, cos, sin, causal_attend)
            layer = self.cfg.exits[g]
            x_BTD = h_BTD
            for _, blk in self.branch_blocks(g):
                x_BTD = blk(x_BTD, cos, sin, causal_attend)
            out.append(self.head_features(g, x_BTD))
        return out

    def forward(self, tokens_BT: torch.Tensor, exits=None) -> list[torch.Tensor]:
        """Logits (B, T, V) for each requested exit (default all), shallow to deep."""
        want = sorted(range(self.cfg.G) if exits is None else set(exits))
        feats = self.features(tokens_BT, want)
        return [F.linear(x, self.unembed_weight(g)) for g, x in zip(want, feats)]
