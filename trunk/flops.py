"""Training FLOPs per token and parameter counts: the one FLOP formula the trainer, sweep runner,
fitter and planner all use.

Conventions (fwd + bwd = 3 x forward, 2 FLOPs per multiply-add):
- "full" (default): 6 x (trunk matmul weights) + attention 12 * L * d_attn * T (Chinchilla: the score
  and value products over the whole context, not halved for causality) + every exit head: 6 * d * V
  for its unembedding, its branch layers (matmuls + attention, as trunk layers), its adapter
  (6 * 2 * d * r) and its RMSNorm (~12 * d: square, mean, scale, weight, and twice that backward).
- "6N": 6 x non-embedding parameters (Kaplan), plus 6 * d * V per exit when heads are counted.
`embeddings=True` adds 6 * V * d for the input embedding (as when N counts embeddings).
This file does not count optimizer or data-loading work, and it never inspects a built model.
"""
from __future__ import annotations

from dataclasses import dataclass

from trunk.config import FamilyConfig

_NORM_FLOPS_PER_D = 12  # RMSNorm fwd ~4 ops/element, bwd ~8


@dataclass(frozen=True)
class ParamCounts:
    non_embedding: int  # trunk layers + final norm + shallow heads' branch/norm/adapter weights
    embedding: int      # token embedding (and the final LM head when it is not tied)
    heads: int          # shallow exit heads (branch layers, norms, adapters, own unembeddings)
    total: int          # every distinct parameter


def _layer_matmul_params(cfg: FamilyConfig) -> int:
    d, E = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * E + 2 * d * cfg.n_kv_heads * E + cfg.n_heads * E * d
    return attn + 3 * d * cfg.d_ff


def _layer_params(cfg: FamilyConfig) -> int:
    bias = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim if cfg.qkv_bias else 0
    return _layer_matmul_params(cfg) + bias + 2 * cfg.d_model  # + two RMSNorm weights


def _head_params(cfg: FamilyConfig) -> tuple[int, int]:
    """(non-embedding params, own-unembedding params) of one shallow exit head."""
    d = cfg.d_model
    body = cfg.branch_layers * _layer_params(cfg) + d + 2 * d * cfg.adapter_rank
    own = cfg.vocab_size * d if cfg.exit_unembed == "own" else 0
    return body, own


def param_counts(cfg: FamilyConfig) -> ParamCounts:
    n_shallow = cfg.G - 1
    body, own = _head_params(cfg)
    trunk = cfg.n_layers * _layer_params(cfg) + cfg.d_model
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    non_emb = trunk + n_shallow * body
    heads = n_shallow * (body + own)
    return ParamCounts(non_embedding=non_emb, embedding=emb, heads=heads,
                       total=non_emb + emb + n_shallow * own)


@dataclass(frozen=True)
class FlopBreakdown:
    """Per-token training FLOPs (fwd + bwd) by kind; `matmul` is what a matmul counter sees."""
    trunk_matmul: float  # trunk decoder layers' projections and MLPs
    attention: float     # score and value products of trunk and branch layers (12 * d_attn * T each)
    heads: float         # exit heads' matmuls: unembeddings, branch-layer projections, adapters
    norms: float         # exit heads' RMSNorms
    embedding: float     # 6 * V * d when embeddings are counted

    @property
    def matmul(self) -> float:
        return self.trunk_matmul + self.attention + self.heads

    @property
    def total(self) -> float:
        return self.matmul + self.norms + self.embedding


def flop_breakdown(cfg: FamilyConfig, seq_len: int | None = None, *, convention: str = "full",
                   embeddings: bool = False, heads: bool = True) -> FlopBreakdown:
    T = seq_len or cfg.max_seq_len
    d, V = cfg.d_model, cfg.vocab_size
    emb = 6.0 * V * d if embeddings else 0.0
    if convention == "6N":
        unemb = 6.0 * d * V * cfg.G if heads else 0.0
        return FlopBreakdown(6.0 * param_counts(cfg).non_embedding, 0.0, unemb, 0.0, emb)
    if convention != "full":
        raise ValueError(f"unknown FLOP convention {convention!r}; use 'full' or '6N'")
    attn_per_layer = 12.0 * cfg.n_heads * cfg.head_dim * T
    layer_mm = 6.0 * _layer_matmul_params(cfg)
    trunk = cfg.n_layers * layer_mm
    attn = cfg.n_layers * attn_per_layer
    head_mm = norms = 0.0
    if heads:
        n_shallow = cfg.G - 1
        attn += n_shallow * cfg.branch_layers * attn_per_layer
        head_mm = (cfg.G * 6.0 * d * V
                   + n_shallow * (cfg.branch_layers * layer_mm + 12.0 * d * cfg.adapter_rank))
        norms = cfg.G * _NORM_FLOPS_PER_D * d
    return FlopBreakdown(trunk, attn, head_mm, norms, emb)


def flops_per_token(cfg: FamilyConfig, seq_len: int | None = None, *, convention: str = "full",
                    embeddings: bool = False, heads: bool = True) -> float:
    """Training FLOPs (forward + backward) per token of a family; see the module docstring."""
    return flop_breakdown(cfg, seq_len, convention=convention, embeddings=embeddings, heads=heads).total


def tokens_for_budget(cfg: FamilyConfig, C: float, seq_len: int | None = None, **kw) -> float:
    """Training tokens D that a compute budget C (FLOPs) buys: D = C / flops_per_token."""
    if C <= 0:
        raise ValueError(f"compute budget must be positive, got {C}")
    return C / flops_per_token(cfg, seq_len, **kw)
