"""The KV pool of one stage: preallocated keys/values and boundary logs for a fixed number of slots.

Layout (what `kernels.decode_attention` / `kernels.prefill_attention` read directly, `cache_slots`):
    k, v   (n_cached_layers, n_slots, K, S, E)   layer i of the stage uses k[i], a (slot, K, S, E) cache
    logs   (n_logs, n_slots, S, D)               boundary hidden states by position (trunk state at an exit)
A sequence owns one slot for as long as it is resident; its positions [0, S) map to the slot's rows, so
a step writes and reads in place and never copies a cache. S is the longest sequence the pool serves
(default the model's max_seq_len), so a resident sequence can never run out of room: the pool is full
only when every slot is taken, and then new work waits or an idle sequence is evicted (the tier engine
decides; this file only hands out slots).

Sizing: `plan_slots` turns a byte budget (a flag, or a fraction of free device memory as vLLM's
gpu_memory_utilization) into a slot count; `bytes_per_token` is what one position costs across the
stage's cached layers and logs. The pool knows nothing of sequences, positions in use or the network.

Legend: K kv heads, S positions per slot, E head dim, D d_model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class PoolError(RuntimeError):
    """The pool cannot be built as asked (no room for one slot)."""


@dataclass(frozen=True)
class PoolShape:
    n_layers: int        # cached decoder layers of the stage (trunk + exit branch layers)
    n_kv_heads: int
    head_dim: int
    n_logs: int          # boundary logs (internal exits + the output boundary of a non-last tier)
    d_model: int
    max_len: int         # S: positions per slot
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        el = torch.empty((), dtype=self.dtype).element_size()
        return el * (2 * self.n_layers * self.n_kv_heads * self.head_dim + self.n_logs * self.d_model)

    def bytes_per_slot(self) -> int:
        return self.bytes_per_token() * self.max_len


def plan_slots(shape: PoolShape, device, *, memory_bytes: int | None = None, memory_fraction: float = 0.5,
               max_slots: int = 1024) -> int:
    """Slots that fit `memory_bytes`, or `memory_fraction` of the device's free memory (CUDA) / of the
    host's available memory (CPU, where a smaller cap applies by default)."""
    if memory_bytes is None:
        free = _free_bytes(torch.device(device))
        memory_bytes = int(free * memory_fraction)
    n = min(max_slots, memory_bytes // max(1, shape.bytes_per_slot()))
    if n < 1:
        raise PoolError(f"a KV pool slot needs {shape.bytes_per_slot() / 2**20:.1f} MiB "
                        f"({shape.max_len} positions x {shape.bytes_per_token()} B); the budget is "
                        f"{memory_bytes / 2**20:.1f} MiB (raise --kv-memory-mb / --kv-memory-fraction or lower --max-model-len)")
    return int(n)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import os
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


class KVPool:
    """`scratch`: one more slot that is never handed out (CUDA graphs' padding rows write there)."""

    def __init__(self, shape: PoolShape, n_slots: int, device, scratch: bool = False):
        self.shape, self.n_slots, self.device = shape, int(n_slots), torch.device(device)
        self.scratch_slot = n_slots if scratch else None
        n_slots = n_slots + int(scratch)
        S, K, E = shape.max_len, shape.n_kv_heads, shape.head_dim
        # zero-filled: a slot's unwritten rows are never read (lengths bound every read), but zeros keep
        # debugging dumps and NaN checks quiet
        self.k = torch.zeros(shape.n_layers, n_slots, K, S, E, dtype=shape.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.logs = torch.zeros(shape.n_logs, n_slots, S, shape.d_model, dtype=shape.dtype, device=self.device)
        self._free = list(range(self.n_slots - 1, -1, -1))  # pop() hands out slot 0 first

    # ---- slots ---------------------------------------------------------------------------------
    def alloc(self) -> int | None:
        """A free slot, or None when the pool is full."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots or slot in self._free:
            raise PoolError(f"slot {slot} freed twice or out of range")
        self._free.append(slot)

    @property
    def n_free(self) -> int:
        return len(self._free)

    # ---- sizes ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.logs))

    def describe(self) -> dict:
        return {"slots": self.n_slots, "free_slots": self.n_free, "max_len": self.shape.max_len,
                "bytes_per_token": self.shape.bytes_per_token(), "bytes": self.nbytes(),
                "dtype": str(self.shape.dtype).removeprefix("torch.")}
