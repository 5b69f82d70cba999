"""The familial model's architecture config and its table of named presets.

One dataclass describes a whole family: the Llama/Qwen2-style trunk and its exit heads. Everything
else (the FLOP count, the checkpoint, the stage shards, the planner) reads this one definition.
This file holds no math and builds no modules; see `trunk/model.py` for that.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the field."""


@dataclass
class FamilyConfig:
    vocab_size: int = 259            # rows of the embedding / unembedding (>= tokenizer vocab)
    d_model: int = 64                # residual width d
    n_layers: int = 4                # trunk decoder layers L
    n_heads: int = 4                 # query heads Hq
    n_kv_heads: int = 2              # key/value heads Hkv (grouped-query attention; Hq % Hkv == 0)
    d_ff: int = 176                  # SwiGLU hidden width
    max_seq_len: int = 256           # longest position the RoPE tables and caches must cover
    rope_theta: float = 10000.0      # RoPE base
    norm_eps: float = 1e-5           # RMSNorm epsilon
    qkv_bias: bool = False           # q/k/v projections carry a bias (Qwen2) or not (Llama)
    tie_embeddings: bool = True      # final LM head shares the token embedding matrix
    exit_layers: tuple[int, ...] = (1, 2)  # shallow exits l_1 < ... < l_{G-1} < L; exit G is the final output
    branch_layers: int = 0           # k extra decoder layers in each shallow exit head (TeleAI: k=1)
    adapter_rank: int = 0            # low-rank adapter (r) in each shallow exit head; 0 = none
    exit_unembed: str = "tied"       # shallow exits' unembedding: "tied" to the final head, or "own"
    head_dim_override: int = 0       # head dim when it is not d_model / n_heads (0 = derive)

    def __post_init__(self) -> None:
        self.exit_layers = tuple(int(x) for x in self.exit_layers)
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def G(self) -> int:
        """Number of exits, the final output included."""
        return len(self.exit_layers) + 1

    @property
    def exits(self) -> tuple[int, ...]:
        """Trunk depth at which each exit reads the residual stream, shallow to deep (last == L)."""
        return self.exit_layers + (self.n_layers,)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            need(int(getattr(self, name)) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.head_dim_override > 0 or self.d_model % self.n_heads == 0,
             f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        need(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE")
        ex = self.exit_layers
        need(all(0 < l < self.n_layers for l in ex),
             f"exit layers {list(ex)} must lie in [1, n_layers-1] = [1, {self.n_layers - 1}]")
        need(all(a < b for a, b in zip(ex, ex[1:])), f"exit layers {list(ex)} must be strictly increasing")
        need(self.branch_layers >= 0 and self.adapter_rank >= 0, "branch_layers and adapter_rank must be >= 0")
        need(self.exit_unembed in ("tied", "own"), f"exit_unembed must be 'tied' or 'own', got {self.exit_unembed!r}")

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exit_layers"] = list(self.exit_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FamilyConfig":
        """Build from a mapping; `preset: NAME` starts from a preset and the other keys override it."""
        d = dict(d)
        base = {}
        if "preset" in d:
            base = get_preset(d.pop("preset")).to_dict()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        base.update(d)
        return cls(**base)

    def replace(self, **kw) -> "FamilyConfig":
        return dataclasses.replace(self, **kw)


def _llama(d, L, H, kv, ff, exits=(), vocab=32000, seq=2048, **kw) -> FamilyConfig:
    return FamilyConfig(vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, n_kv_heads=kv, d_ff=ff,
                        max_seq_len=seq, exit_layers=tuple(exits), **kw)


# Named presets. The paper (arXiv 2512.23407, Tables 1/2) gives sizes and exit layers but not every
# width; the shapes below are Llama-style reconstructions at those sizes with the paper's exits.
PRESETS: dict[str, FamilyConfig] = {
    # CPU tests: tiny and odd-sized on purpose.
    "tiny": _llama(64, 4, 4, 2, 176, exits=(1, 2), vocab=259, seq=256),
    # The committed built-in family (byte-level BPE vocab 2048): ~6 MB in fp16.
    "builtin": _llama(192, 6, 6, 2, 512, exits=(2, 4), vocab=2048, seq=512),
    # Benchmarks / small real runs.
    "20m": _llama(384, 8, 6, 2, 1024, exits=(2, 4, 6), vocab=8192, seq=1024),
    "100m": _llama(768, 12, 12, 4, 2048, exits=(3, 6, 9), vocab=32000, seq=2048),
    "1b": _llama(2048, 22, 32, 4, 5632, exits=(6, 11, 16), vocab=32000, seq=2048),  # TinyLlama-1.1B shape
    # Paper Table 1 (dense baselines) and Table 2 (families).
    "dense-1b": _llama(2048, 22, 32, 4, 5632),
    "dense-2b": _llama(2048, 24, 32, 8, 8192),
    "dense-3b": _llama(2560, 28, 32, 8, 8960),
    "dense-4b": _llama(3072, 28, 24, 8, 8192),
    "family-2b": _llama(2048, 24, 32, 8, 8192, exits=(10,)),
    "family-3b": _llama(2560, 28, 32, 8, 8960, exits=(6, 20)),
    "family-4b": _llama(3072, 28, 24, 8, 8192, exits=(4, 16, 18)),
}


def get_preset(name: str) -> FamilyConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
