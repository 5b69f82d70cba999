"""CUDA graphs of a stage's decode steps: one graph per (segment, batch-size bucket, with/without head).

A decode step (every sequence brings one row) is hundreds of small kernels; replaying a captured graph
launches them all at once. Graphs need static shapes and addresses, which the pool's slot layout gives:
inputs are copied into static buffers (rows, positions, slots), a batch of B rows runs the graph of the
smallest bucket >= B, and the padding rows write to the pool's scratch slot (never handed out) at
position 0, so they disturb nothing. Everything the step reads per sequence (positions, slots, cache
lengths) is read on the device, so one capture serves every later step (nano-vllm's model runner and
vLLM's piecewise graphs do the same).

What a graph holds: `Stage.segment_math` for that segment -- the fused blocks, the boundary-log write,
the exit's branch layers and (head variant) the exit's logits and their argmax. Eager code before and
after it does the bookkeeping and sampling (greedy steps take the graph's own argmax). `run_burst`
replays the whole-stage graph k times in a row for greedy decoding, feeding each step's argmax to the
next on the device (vLLM's multi-step scheduling): the host pays for one step's bookkeeping per k
tokens; its "mixed" graph does the same when rows answer at different exits of the stage (a row
above a segment's exit is a padding row there: matmul rows, but no KV read or write of its own).
Capture happens once at start-up (warm-up run first, so Triton autotuning and cuBLAS handle
creation stay out of the capture). Not here: prefill or mixed steps (eager).
Legend: B rows (sequences), nb bucket, D d_model, V vocab.
"""
from __future__ import annotations

import time

import torch

from trunk.kv_pool import KVPool

DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, stage, pool: KVPool, max_batch: int = 256, buckets=DEFAULT_BUCKETS):
        if pool.scratch_slot is None:
            raise ValueError("CUDA graphs need a pool with a scratch slot (KVPool(..., scratch=True))")
        self.stage, self.pool = stage, pool
        self.buckets = sorted({b for b in buckets if b <= max_batch} | {max_batch})
        n, dev = self.buckets[-1], stage.device
        # one (3, n) int64 input: token ids, positions, slots -- one host-to-device copy per step
        self.inp = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.inp[2] = pool.scratch_slot
        self.ids, self.pos, self.slot64 = self.inp[0], self.inp[1], self.inp[2]
        self.h = torch.zeros(n, stage.cfg.d_model, dtype=stage.dtype, device=dev)
        self.row_seg = torch.zeros(n, dtype=torch.long, device=dev)   # "mixed": each row's exit segment
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        # pinned host staging per segment: a segment's copies are still in flight while the next fills its own
        self.host = [torch.zeros(3, n, dtype=torch.long).pin_memory() for _ in stage.segments]
        self._pad = torch.tensor([[0], [pool.scratch_slot]])   # padding rows: position 0 of the scratch slot
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.toks: torch.Tensor | None = None       # run_burst's (k, n) tokens
        self.mempool = None
        self.capture_s = 0.0
        self.replays = 0

    def bucket(self, B: int) -> int | None:
        for b in self.buckets:
            if b >= B:
                return b
        return None

    def _body(self, s, nb: int, head: bool):
        """Segment s (or, s == "all", every segment in turn: a decode step of the whole stage) on the
        static buffers. Everything derived from them (int32 offsets, cache
        lengths) is computed here, inside the capture: a tensor made outside it and read by the graph
        would be freed and its memory reused under the graph's feet."""
        from trunk.stage import AttnMeta

        st = self.stage
        meta = AttnMeta.static(self.pos[:nb], self.slot64[:nb].to(torch.int32), self.cu[:nb + 1])
        first = 0 if s in ("all", "mixed") else s
        x = st.model.embed(self.ids[:nb]) if first == 0 and st.has_embedding else self.h[:nb]
        if s == "mixed":  # every segment, each row answering at its own exit (row_seg)
            rs, tok, last = self.row_seg[:nb], None, len(st.segments) - 1
            for k in range(last + 1):
                m = meta
                if k > 0:  # rows whose exit lies above k run here as padding rows: no KV read, no KV kept
                    live = rs >= k
                    m = AttnMeta.static(torch.where(live, self.pos[:nb], 0),
                                        torch.where(live, self.slot64[:nb], self.pool.scratch_slot).to(torch.int32),
                                        self.cu[:nb + 1])
                x, xb, logits = st.segment_math(k, x, m, self.pool, True)
                t = logits.argmax(-1)
                tok = t if tok is None else torch.where(rs == k, t, tok)
            return x, xb, None, tok
        if s != "all":
            x, xb, logits = st.segment_math(s, x, meta, self.pool, head)
        else:
            last = len(st.segments) - 1
            for k in range(last + 1):
                x, xb, logits = st.segment_math(k, x, meta, self.pool, head and k == last)
        return x, xb, logits, (logits.argmax(-1) if head else None)   # greedy tokens, in the graph

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every (segment, bucket, head) graph, largest first (smaller ones reuse its memory)."""
        t0 = time.perf_counter()
        self.mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        multi = len(self.stage.segments) > 1
        segs = list(range(len(self.stage.segments))) + (["all"] if multi else [])
        segs += ["mixed"] if multi and not self.stage.has_next and self.stage.has_embedding else []
        for s in segs:
            for nb in reversed(self.buckets):
                for head in ((True,) if s == "mixed" else (True, False)):
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        self._body(s, nb, head)       # warm-up: autotuning, handles, lazy init
                    torch.cuda.current_stream().wait_stream(stream)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.mempool):
                        out = self._body(s, nb, head)
                    self.graphs[(s, nb, head)] = (g, out)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        return self.capture_s

    def run(self, s: int, x, meta, head: bool):
        """Replay for rows x -- (B,) token ids (host or device) or (B, D) states -- of `meta`'s sequences:
        (h, xb, logits, greedy tokens) of the B rows; None if no bucket fits."""
        # The staging buffer of segment s is rewritten each step: the previous step's copy from it has
        # completed, since every step ends with a host sync (its sampled tokens).
        B = len(meta.counts)
        nb = self.bucket(B)
        if nb is None or (s, nb, head) not in self.graphs:
            return None
        host = self.host[0 if s in ("all", "mixed") else s]
        ids = s in (0, "all", "mixed") and self.stage.has_embedding
        if ids and x.device.type == "cpu":
            host[0, :B] = x
        host[1, :B] = torch.as_tensor(meta.offs)
        host[2, :B] = torch.as_tensor(meta.slots)
        host[1:, B:nb] = self._pad
        if ids and x.device.type == "cpu":
            self.inp[:, :nb].copy_(host[:, :nb], non_blocking=True)
        else:
            self.inp[1:, :nb].copy_(host[1:, :nb], non_blocking=True)
            (self.ids if ids else self.h)[:B].copy_(x)
        g, (h, xb, logits, tok) = self.graphs[(s, nb, head)]
        g.replay()
        self.replays += 1
        return h[:B], xb[:B], (logits[:B] if logits is not None else None), (tok[:B] if tok is not None else None)

    def run_burst(self, x, meta, k: int, row_seg: list[int] | None = None):
        """k greedy decode steps of the whole stage back to back, without the host in between: step j+1
        reads step j's argmax (on the device) as its token and every position advanced by one. With
        row_seg (each row's exit segment, some above the last) the "mixed" graph runs: row i answers at
        segment row_seg[i]'s exit and deeper segments treat it as padding (its KV there is not kept).
        Returns the (k, B) tokens on the device (one copy to the host for all k), or None if no graph fits."""
        B = len(meta.counts)
        nb = self.bucket(B)
        key = "mixed" if row_seg is not None else "all" if len(self.stage.segments) > 1 else 0
        if nb is None or (key, nb, True) not in self.graphs or not self.stage.has_embedding:
            return None
        if self.toks is None or self.toks.shape[0] < k:
            self.toks = torch.empty(max(k, 8), self.buckets[-1], dtype=torch.long, device=self.stage.device)
        if row_seg is not None:
            self.row_seg[:B].copy_(torch.as_tensor(row_seg), non_blocking=False)
            self.row_seg[B:nb].zero_()
        got = self.run(key, x, meta, True)
        g, (_, _, _, tok) = self.graphs[(key, nb, True)]
        self.toks[0, :B].copy_(got[3])
        for j in range(1, k):
            self.ids[:B].copy_(tok[:B])
            self.pos[:nb].add_(1)
            g.replay()
            self.toks[j, :B].copy_(tok[:B])
        self.replays += k - 1
        return self.toks[:k, :B]
