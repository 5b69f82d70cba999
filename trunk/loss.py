"""The family training loss: a weighted mean of the exits' next-token cross-entropies.

L = sum_g w_g * CE_g with w_g = 1/G by default. On CUDA the kernels' fused multi-exit linear +
cross-entropy computes it without materialising any (tokens x V) logits (also on CPU under
FAMILIAL_KERNELS=triton, in Triton's interpreter, so tests can reach it); elsewhere the plain
PyTorch path below is the reference. This file does not choose exits or weights; the
trainer's config does.

Legend: B batch, T positions, D d_model, V vocab, N = B*T rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels

IGNORE_INDEX = -100


def exit_weights(G: int, weights=None) -> list[float]:
    """Normalised per-exit weights; default uniform 1/G."""
    w = [1.0] * G if weights is None else [float(x) for x in weights]
    if len(w) != G or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"exit weights must be {G} non-negative numbers with a positive sum, got {weights}")
    s = sum(w)
    return [x / s for x in w]


def family_loss(model, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, weights=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss, per-exit CE of shape (G,) detached). Targets use IGNORE_INDEX for padding."""
    G = model.cfg.G
    w = exit_weights(G, weights)
    feats = model.features(tokens_BT)  # G x (B, T, D)
    targets_N = targets_BT.reshape(-1)
    fused = feats[0].is_cuda or kernels.mode() == "triton"  # CPU + triton: the interpreter (tests)
    if fused and not torch.compiler.is_compiling():  # fused, chunked: no (N x V) logits
        # (kernels/linear_ce.py); a torch.compile'd trainer keeps the plain path below
        hs_N = [x_BTD.reshape(-1, x_BTD.shape[-1]) for x_BTD in feats]
        loss, losses_G = kernels.multi_exit_linear_cross_entropy(
            hs_N, [model.unembed_weight(g) for g in range(G)], targets_N, weights=w,
            ignore_index=IGNORE_INDEX, return_per_exit=True)
        return loss, losses_G.detach()
    per_exit = []
    for g, x_BTD in enumerate(feats):
        logits_NV = F.linear(x_BTD.reshape(-1, x_BTD.shape[-1]), model.unembed_weight(g)).float()
        per_exit.append(F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE_INDEX))
    losses_G = torch.stack(per_exit)
    loss = (losses_G * losses_G.new_tensor(w)).sum()
    return loss, losses_G.detach()
