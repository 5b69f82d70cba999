"""Per-session key/value cache for a set of decoder layers (trunk layers and exit-branch layers).

The cache is keyed by layer name (`"layers.7"`, `"heads.0.branch.0"`) so one object serves any layer
range a stage holds. Each layer's keys/values live in a preallocated buffer that doubles when full;
appends must be contiguous in position (the relay's KV-consistency invariant depends on it, so a gap
is an error rather than something to paper over). This file knows nothing of sessions, eviction or
the network; `relay/` owns those.

Legend: B batch, K kv heads, S cached positions, T new positions, E head dim.
"""
from __future__ import annotations

import torch


class CacheError(ValueError):
    """Positions appended out of order, or past the configured limit."""


class LayerKV:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.k_BKSE: torch.Tensor | None = None
        self.v_BKSE: torch.Tensor | None = None
        self.length = 0

    def append(self, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions [start, start+T) and return views of all positions [0, start+T)."""
        if start != self.length:
            raise CacheError(f"KV append at position {start} but the cache holds {self.length} positions")
        T = k_BKTE.shape[2]
        end = start + T
        if end > self.max_tokens:
            raise CacheError(f"KV cache limit of {self.max_tokens} positions exceeded (would hold {end})")
        if self.k_BKSE is None or end > self.k_BKSE.shape[2]:
            self._grow(k_BKTE, end)
        self.k_BKSE[:, :, start:end] = k_BKTE
        self.v_BKSE[:, :, start:end] = v_BKTE
        self.length = end
        return self.k_BKSE[:, :, :end], self.v_BKSE[:, :, :end]

    def _grow(self, like_BKTE: torch.Tensor, need: int) -> None:
        cap = max(16, need)
        if self.k_BKSE is not None:
            cap = max(cap, 2 * self.k_BKSE.shape[2])
        cap = min(cap, max(self.max_tokens, need))
        B, K, _, E = like_BKTE.shape
        k = like_BKTE.new_empty(B, K, cap, E)
        v = like_BKTE.new_empty(B, K, cap, E)
        if self.k_BKSE is not None:
            k[:, :, : self.length] = self.k_BKSE[:, :, : self.length]
            v[:, :, : self.length] = self.v_BKSE[:, :, : self.length]
        self.k_BKSE, self.v_BKSE = k, v

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        if self.k_BKSE is None:
            return 0
        return 2 * self.k_BKSE.numel() * self.k_BKSE.element_size()


class KVCache:
    """All layers' KV for one session (or one batch of sequences sharing positions)."""

    def __init__(self, max_tokens: int = 1 << 20):
        self.max_tokens = max_tokens
        self.layers: dict[str, LayerKV] = {}

    def layer(self, name: str) -> LayerKV:
        if name not in self.layers:
            self.layers[name] = LayerKV(self.max_tokens)
        return self.layers[name]

    def length(self, name: str) -> int:
        kv = self.layers.get(name)
        return 0 if kv is None else kv.length

    def truncate(self, length: int) -> None:
        for kv in self.layers.values():
            kv.truncate(length)

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in self.layers.values())
