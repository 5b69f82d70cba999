"""Run a Stage over a KV pool chunk by chunk, every row evaluated at every exit (shared by the CPU
stage tests and the GPU wiring tests)."""
from __future__ import annotations

import torch

from trunk.kv_pool import KVPool
from trunk.sampling import ExitPolicy
from trunk.stage import SeqRun, Stage

NEVER = ExitPolicy("max_prob", 2.0)  # a confidence policy that never passes: every exit is evaluated


def chunked_logits(model, tokens_BT: torch.Tensor, chunks, max_len: int = 128, fused=None) -> dict[int, torch.Tensor]:
    """Per-exit logits (B, T, V) of a whole-family Stage fed `chunks` [(a, b), ...] of every row at once
    (fused: the serving blocks of trunk/fused.py, default on CUDA only)."""
    st = Stage(model, list(range(model.cfg.G)), fused=fused)
    B = tokens_BT.shape[0]
    pool = KVPool(st.pool_shape(max_len), B + 1, tokens_BT.device)
    G, out = model.cfg.G, {}
    for a, b in chunks:
        runs = [SeqRun(r + 1, a, b - a, [a] * G, want=G - 1, policy=NEVER, keep_logits=True) for r in range(B)]
        o = st.forward(tokens_BT[:, a:b].reshape(-1), runs, pool)
        for g in range(G):
            out.setdefault(g, []).append(torch.stack([so.logits[g] for so in o.seqs]))
    return {g: torch.cat(v, dim=1) for g, v in out.items()}
