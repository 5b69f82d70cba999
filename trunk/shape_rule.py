"""The width/depth rule of a sweep: a target parameter count in, a Llama-style dense shape out.

The ladder is every (d_model, n_layers) with d_model a multiple of `width_multiple` (and of
`head_dim`), n_layers in [min_layers, max_layers] and an aspect ratio d_model / n_layers within a
factor `aspect_tolerance` of `aspect_ratio`. A target N (non-embedding parameters, as
`trunk.flops.param_counts` counts them) picks the ladder shape nearest in log N, ties going to the
shape closer to the aspect ratio. Heads are d_model / head_dim, KV heads heads / kv_ratio (at least
one), the SwiGLU width ffn_ratio * d_model rounded to `ffn_multiple`.

Exits are placed at fractions of the depth: exit g of G at round(f_g * L), by default f_g = g / G.
This file builds configs only; it knows nothing of budgets, data or training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trunk.config import ConfigError, FamilyConfig
from trunk.flops import param_counts


@dataclass
class ShapeRule:
    head_dim: int = 32             # per-head width; d_model is a multiple of it
    width_multiple: int = 32       # d_model step of the ladder
    aspect_ratio: float = 32.0     # target d_model / n_layers
    aspect_tolerance: float = 1.25  # allowed factor off the aspect ratio (finer N steps when > 1)
    min_layers: int = 4            # shallowest trunk (G exits need at least G layers)
    max_layers: int = 48
    max_width: int = 4096
    kv_ratio: int = 1              # query heads per KV head (1 = multi-head attention)
    ffn_ratio: float = 8 / 3       # SwiGLU hidden width / d_model
    ffn_multiple: int = 32
    extra: dict = field(default_factory=dict)  # any other FamilyConfig fields (qkv_bias, rope_theta, ...)

    def validate(self) -> None:
        for name in ("head_dim", "width_multiple", "min_layers", "max_layers", "max_width", "kv_ratio",
                     "ffn_multiple"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"shape.{name} must be a positive integer, got {getattr(self, name)}")
        if self.width_multiple % self.head_dim:
            raise ConfigError(f"shape.width_multiple ({self.width_multiple}) must be a multiple of shape.head_dim "
                              f"({self.head_dim})")
        if not (self.aspect_ratio > 0 and self.aspect_tolerance >= 1 and self.ffn_ratio > 0):
            raise ConfigError("shape.aspect_ratio and shape.ffn_ratio must be > 0 and shape.aspect_tolerance >= 1")
        if self.min_layers > self.max_layers:
            raise ConfigError(f"shape.min_layers ({self.min_layers}) exceeds shape.max_layers ({self.max_layers})")


def dense_shape(d_model: int, n_layers: int, rule: ShapeRule, vocab_size: int, seq_len: int) -> FamilyConfig:
    heads = d_model // rule.head_dim
    kv = max(1, heads // rule.kv_ratio)
    while heads % kv:  # GQA needs heads to be a multiple of the KV heads
        kv -= 1
    d_ff = max(rule.ffn_multiple, int(round(rule.ffn_ratio * d_model / rule.ffn_multiple)) * rule.ffn_multiple)
    return FamilyConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=heads,
                        n_kv_heads=kv, d_ff=d_ff, max_seq_len=seq_len, exit_layers=(),
                        **{k: v for k, v in rule.extra.items() if k not in ("exit_layers",)})


def ladder(rule: ShapeRule, vocab_size: int, seq_len: int) -> list[FamilyConfig]:
    """Every shape the rule allows, sorted by non-embedding parameters."""
    out = []
    lo, hi = rule.aspect_ratio / rule.aspect_tolerance, rule.aspect_ratio * rule.aspect_tolerance
    for d in range(rule.width_multiple, rule.max_width + 1, rule.width_multiple):
        for L in range(rule.min_layers, rule.max_layers + 1):
            if lo - 1e-9 <= d / L <= hi + 1e-9:
                out.append(dense_shape(d, L, rule, vocab_size, seq_len))
    if not out:
        raise ConfigError("the shape rule allows no shape: widen shape.aspect_tolerance or the layer range")
    return sorted(out, key=lambda c: param_counts(c).non_embedding)


def nearest_shape(target_N: float, shapes: list[FamilyConfig], rule: ShapeRule) -> FamilyConfig:
    """The ladder shape nearest to target_N in log N (ties: nearer the aspect ratio)."""
    def score(c: FamilyConfig):
        n = param_counts(c).non_embedding
        return (round(abs(math.log(n / target_N)), 9), abs(math.log(c.d_model / c.n_layers / rule.aspect_ratio)))
    return min(shapes, key=score)


def exit_layers(n_layers: int, fractions: list[float]) -> tuple[int, ...]:
    """Shallow exit layers at round(f * L) for each fraction (the final exit, at L, is implied)."""
    layers = tuple(int(math.floor(f * n_layers + 0.5)) for f in fractions)
    if any(not 0 < l < n_layers for l in layers) or any(a >= b for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"exit fractions {fractions} give exit layers {list(layers)} in a {n_layers}-layer trunk; "
                          f"they must be distinct and inside [1, {n_layers - 1}] (raise shape.min_layers)")
    return layers


def uniform_fractions(G: int) -> list[float]:
    return [g / G for g in range(1, G)]
