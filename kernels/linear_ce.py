"""Multi-exit fused linear + cross-entropy for training, chunked so that no (N x V) logits exist.

Loss over G exits with features h_g (N, H), unembeddings W_g (V, H) (often one tied W), targets y:
    L = sum_g w_g * CE_g,   CE_g = (1 / n) sum_{r: y_r != ignore} (lse(z_gr) - z_gr[y_r]),   z_gr = W_g h_gr
with n the number of non-ignored targets (shared by the exits; clamped to >= 1 so an all-ignored
batch gives 0, not NaN) and w_g = 1/G by default. Gradients, with c_g = w_g / n:
    dL/dz_grv = c_g (softmax(z_gr)_v - [v = y_r])        (0 for ignored rows)
    dL/dh_gr  = sum_v dL/dz_grv W_gv,      dL/dW_g = sum_r dL/dz_gr^T h_gr
Like Liger-Kernel's fused linear CE, the gradients are computed during the forward, chunk by chunk:
  1. z = h_chunk W^T into a reusable (R x V) buffer (cuBLAS, fp32 accumulation, W's dtype);
  2. a Triton kernel per row: online max/sum-exp over V (pass 1), loss = lse - z_y, then overwrites
     the row with dL/dz (pass 2) in place;
  3. dh_chunk = dz W and dW += dz^T h_chunk (cuBLAS).
With tied heads the chunk stacks the same rows of every exit, (G*n x H), so W is streamed once per
chunk for all exits. The backward only scales the stored gradients by the incoming grad (1 in
training). Peak extra memory: one R x V buffer + the gradients themselves; R defaults to what fits
in 128 MiB (512 rows at V = 128k). dW accumulates in W's dtype (fp32 accumulation inside each GEMM, one rounding per chunk),
as Liger does: an fp32 accumulator would cost 2x W's bytes.

Not here: label smoothing, z-loss, soft-capping; choosing the exit weights (trunk/loss.py does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import jit, tl

CHUNK_BYTES = 128 * 2**20


@jit(default=dict(BLOCK_V=4096, num_warps=8), interpret_default=dict(BLOCK_V=1024))
def _ce_fwd_bwd_kernel(
    Z, TARGETS, SCALES, LOSS, sz, V, N_PER, ignore_index,
    HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Row r of the chunk belongs to exit r // N_PER and target r % N_PER.
    row = tl.program_id(0)
    y = tl.load(TARGETS + row % N_PER)
    ignored = y == ignore_index
    z_row = Z + row.to(tl.int64) * sz
    offs = tl.arange(0, BLOCK_V)

    # pass 1: online logsumexp, m' = max(m, max z), s' = s e^{m - m'} + sum e^{z - m'}
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(z_row + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))  # finite: every block holds a valid column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    y_safe = tl.where(ignored, 0, y)
    z_y = tl.load(z_row + y_safe).to(tl.float32)  # read before pass 2 overwrites the row
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - z_y))

    # pass 2: dL/dz = c (softmax - onehot), c = w_g / n for this row's exit, 0 if ignored
    if HAS_GRAD:
        c = tl.where(ignored, 0.0, tl.load(SCALES + row // N_PER))
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse) - tl.where(cols == y_safe, 1.0, 0.0)) * c
            tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=cols < V)


def _chunk_rows(V: int, elt: int, chunk_rows) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    r = CHUNK_BYTES // max(1, V * elt)
    return int(max(64, min(8192, r // 64 * 64)))


_WEIGHTS: dict = {}  # (weights, device) -> the weights on the device, made once


def _exit_weights(G: int, weights, device) -> torch.Tensor:
    """The exits' weights as a float32 tensor on the device. Cached: copying them from the host in every
    step would be a host-to-device copy that a CUDA graph capture of the step cannot record."""
    if isinstance(weights, torch.Tensor) and weights.device == torch.device(device):
        w = weights.to(torch.float32)
    else:
        key = (G, None if weights is None else tuple(float(x) for x in weights), str(device))
        w = _WEIGHTS.get(key)
        if w is None:
            w = torch.full((G,), 1.0 / G) if weights is None else torch.tensor(key[1], dtype=torch.float32)
            w = _WEIGHTS.setdefault(key, w.to(device))
    if w.numel() != G:
        raise ValueError(f"{G} exits but {w.numel()} weights")
    return w


def _ce_chunk(z, targets, scales, loss_rows, n_per, ignore_index, has_grad):
    """Run the row kernel on the chunk buffer z (R, V): fills loss_rows (R,), z <- dL/dz if has_grad."""
    R, V = z.shape
    _ce_fwd_bwd_kernel[(R,)](z, targets, scales, loss_rows, z.stride(0), V, n_per, ignore_index,
                             HAS_GRAD=has_grad)


def _fused_forward(hs, Ws, targets, w_G, ignore_index, chunk_rows, need_h, need_W):
    """Loss sums per exit (G,) and the gradients (dL/dh_g, dL/dW_k) for a unit upstream gradient."""
    G = len(hs)
    N, H = hs[0].shape
    V = Ws[0].shape[0]
    dev, dt = hs[0].device, Ws[0].dtype
    tied = len(Ws) == 1
    n_valid = (targets != ignore_index).sum().clamp_min(1).to(torch.float32)
    scales = w_G / n_valid  # dL/d(sum of row CEs of exit g)
    grad_h = [torch.empty_like(h) if need else None for h, need in zip(hs, need_h)]
    # dW is written by the first chunk's GEMM (beta = 0) and accumulated by the rest: no memset and
    # one read of dW less than zeros + addmm
    grad_W = [(torch.empty_like(W) if N else torch.zeros_like(W)) if need else None for W, need in zip(Ws, need_W)]
    loss_G = torch.zeros(G, device=dev, dtype=torch.float32)
    has_grad = any(need_h) or any(need_W)

    rows = _chunk_rows(V, torch.tensor([], dtype=dt).element_size(), chunk_rows)
    per = max(1, rows // G) if tied else rows          # rows of each exit per step
    stack = G if tied else 1                           # exits stacked in one GEMM
    z_buf = torch.empty(stack * min(per, N), V, device=dev, dtype=dt)
    loss_rows = torch.empty(stack * min(per, N), device=dev, dtype=torch.float32)
    x_buf = torch.empty(stack * min(per, N), H, device=dev, dtype=dt) if stack > 1 else None
    dx_buf = torch.empty_like(x_buf) if (x_buf is not None and any(need_h)) else None

    for k, W in enumerate(Ws):
        exits = range(G) if tied else [k]
        for c0 in range(0, N, per):
            n = min(per, N - c0)
            R = n * len(exits)
            if x_buf is None:
                x = hs[k][c0:c0 + n]
            else:
                x = x_buf[:R]
                for j, g in enumerate(exits):
                    x[j * n:(j + 1) * n] = hs[g][c0:c0 + n]
            z = z_buf[:R]
            torch.mm(x.to(dt), W.t(), out=z)
            sc = scales if tied else scales[k:k + 1]
            _ce_chunk(z, targets[c0:c0 + n], sc, loss_rows[:R], n, ignore_index, has_grad)
            part = loss_rows[:R].view(len(exits), n).sum(1)
            if tied:
                loss_G += part
            else:
                loss_G[k] += part[0]
            if any(need_h[g] for g in exits):
                if x_buf is None:
                    torch.mm(z, W, out=grad_h[k][c0:c0 + n])
                else:
                    dx = torch.mm(z, W, out=dx_buf[:R])
                    for j, g in enumerate(exits):
                        if need_h[g]:
                            grad_h[g][c0:c0 + n] = dx[j * n:(j + 1) * n]
            if need_W[k]:
                if c0 == 0:
                    torch.mm(z.t(), x.to(dt), out=grad_W[k])
                else:
                    grad_W[k].addmm_(z.t(), x.to(dt))
    return loss_G / n_valid, grad_h, grad_W


class _MultiExitLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, targets, w_G, ignore_index, chunk_rows, n_exits, *tensors):
        hs, Ws = list(tensors[:n_exits]), list(tensors[n_exits:])
        need = ctx.needs_input_grad[5:]
        need_h, need_W = list(need[:n_exits]), list(need[n_exits:])
        ce_G, grad_h, grad_W = _fused_forward(hs, Ws, targets, w_G, ignore_index, chunk_rows, need_h, need_W)
        ctx.grads = grad_h + grad_W  # not save_for_backward: they are outputs of no graph
        loss = (ce_G * w_G).sum()
        ctx.mark_non_differentiable(ce_G)
        return loss, ce_G

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grads = ctx.grads
        ctx.grads = None
        if grad_loss is not None:  # not read on the host (that would wait for the step); x 1.0 is exact
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return (None, None, None, None, None, *grads)


def _normalise(hs, W, targets):
    if isinstance(hs, torch.Tensor):
        hs = [hs]
    hs = list(hs)
    H = hs[0].shape[-1]
    hs2 = [h.reshape(-1, H) for h in hs]
    if any(h.shape != hs2[0].shape for h in hs2):
        raise ValueError("every exit's features must have the same shape")
    if isinstance(W, (list, tuple)):
        Ws = list(W)
        if len(Ws) != len(hs):
            raise ValueError(f"{len(hs)} exits but {len(Ws)} unembeddings")
        if all(w is Ws[0] for w in Ws):
            Ws = [Ws[0]]
    else:
        Ws = [W]
    tgt = targets.reshape(-1).to(torch.int64)
    if tgt.numel() != hs2[0].shape[0]:
        raise ValueError(f"{tgt.numel()} targets for {hs2[0].shape[0]} rows")
    return hs2, Ws, tgt


def multi_exit_linear_cross_entropy_triton(hs, W, targets, *, weights=None, ignore_index=-100,
                                           chunk_rows=None, return_per_exit=False):
    """Fused chunked loss (see module docstring); same signature and result as the reference."""
    _check_dtypes(hs, W)
    hs, W = _autocast_inputs(hs, W)
    hs2, Ws, tgt = _normalise(hs, W, targets)
    w_G = _exit_weights(len(hs2), weights, hs2[0].device)
    with torch.autocast(hs2[0].device.type, enabled=False):  # our GEMMs run in the inputs' dtype
        if torch.is_grad_enabled() and any(t.requires_grad for t in hs2 + Ws):
            loss, ce_G = _MultiExitLinearCE.apply(tgt, w_G, int(ignore_index), chunk_rows, len(hs2), *hs2, *Ws)
        else:  # evaluation: loss only, one GEMM per chunk
            no = [False] * len(hs2)
            ce_G, _, _ = _fused_forward(hs2, Ws, tgt, w_G, int(ignore_index), chunk_rows, no, [False] * len(Ws))
            loss = (ce_G * w_G).sum()
    return (loss, ce_G) if return_per_exit else loss


def _check_dtypes(hs, W):
    hl = [hs] if isinstance(hs, torch.Tensor) else list(hs)
    wl = list(W) if isinstance(W, (list, tuple)) else [W]
    dev = hl[0].device.type
    if not torch.is_autocast_enabled(dev) and len({t.dtype for t in hl + wl}) != 1:
        raise ValueError("features and unembeddings must share one dtype (or run under autocast)")


def _autocast_inputs(hs, W):
    """Under autocast (e.g. bf16 training with fp32 master weights) cast features and unembeddings to
    the autocast dtype, as F.linear would; gradients flow back through the casts to the fp32 leaves."""
    hl = [hs] if isinstance(hs, torch.Tensor) else list(hs)
    dev = hl[0].device.type
    if not torch.is_autocast_enabled(dev):
        return hs, W
    dt = torch.get_autocast_dtype(dev)
    cast = {}

    def to(t):
        if id(t) not in cast:
            cast[id(t)] = t.to(dt)
        return cast[id(t)]

    hs = [to(h) for h in hl]
    W = [to(w) for w in W] if isinstance(W, (list, tuple)) else to(W)
    return hs, W


def multi_exit_linear_cross_entropy_reference(hs, W, targets, *, weights=None, ignore_index=-100,
                                              chunk_rows=None, return_per_exit=False):
    """PyTorch reference with fp32 logits (materialises N x V per exit; autograd for the gradients)."""
    hs2, Ws, tgt = _normalise(hs, W, targets)
    G = len(hs2)
    Ws = Ws * G if len(Ws) == 1 else Ws
    with torch.autocast(hs2[0].device.type, enabled=False):  # the reference is fp32 whatever the context
        return _reference_loss(hs2, Ws, tgt, weights, ignore_index, return_per_exit)


def _reference_loss(hs2, Ws, tgt, weights, ignore_index, return_per_exit):
    G = len(hs2)
    w_G = _exit_weights(G, weights, hs2[0].device)
    n_valid = (tgt != ignore_index).sum().clamp_min(1).to(torch.float32)
    ce = [F.cross_entropy(h.float() @ Wg.float().t(), tgt, ignore_index=ignore_index, reduction="sum") / n_valid
          for h, Wg in zip(hs2, Ws)]
    ce_G = torch.stack(ce)
    loss = (ce_G * w_G).sum()
    return (loss, ce_G.detach()) if return_per_exit else loss
