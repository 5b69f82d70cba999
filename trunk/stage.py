"""The one stage loop: trunk layers [a, b) and the exits inside, for a batch of sequences at different
positions, over a KV pool.

A stage holds consecutive exits g_0 < ... < g_m of a family (one tier, or the whole family in process).
Segment s is the trunk layers (exits[g_s - 1], exits[g_s]] ending at exit g_s, plus that exit's branch
layers. One call (`Stage.forward`) takes packed rows: sequence b brings `count` new positions starting
at `start`, and runs as deep as its request needs (`SeqRun.depth`); a sequence that stops early (its exit
answered) skips the deeper segments, whose caches then lag behind: their *pending* positions. The next
call that takes the sequence deeper catches those up in the same batched forward, reading the boundary
states of the pending positions from the pool's log. So every segment's KV always covers every earlier
position of the sequences that reach it (the relay's KV-consistency invariant, inside one stage).

Per call and segment: rows of the sequences that reach it (pending + new) -> decoder blocks with
attention over the pool (`PoolAttend`: Triton decode/prefill kernels on CUDA, their PyTorch references
elsewhere) -> boundary log write -> exit branch layers on every row (their KV must cover every position
too) -> for the sequences evaluated here, the head at their last row, confidence statistics and one
batched sampling call (`trunk.sampling`). Sequences that pass the stage's deepest exit without an
answer come back with `exit=None` (the tier sends them deeper) and their features at that exit, from
which a degraded answer can be drawn if the deeper tier fails.

Who uses it: the tier engine (relay/tier.py: scheduling, slots, which positions are pending across
tiers), deploy's stage shards, the in-process engine and the ONNX export's per-segment math. This file
knows nothing of requests, sessions, slots' owners or the network; `trunk/model.py` holds the math.

Legend: N packed rows, B sequences, D d_model, H/K query/kv heads, E head dim, V vocab, S pool positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels
from trunk.kv_pool import KVPool, PoolShape
from trunk.model import FamilyModel
from trunk.sampling import FIXED, GREEDY, FIXED_POLICY, ExitPolicy, SamplingParams, confidence, passes, sample


class StageError(ValueError):
    """A batch the stage cannot run (positions past the pool, a gap in a sequence's cache)."""


@dataclass
class SeqRun:
    """One sequence in one stage call."""
    slot: int                       # pool slot of the sequence
    start: int                      # position of its first new row (== what segment 0 holds)
    count: int                      # new rows (>= 1), packed in order in the call's input
    seg_lens: list[int]             # positions each local segment holds before the call (seg_lens[0] == start)
    want: int | None = None         # global exit asked for (answer there, or at the first confident exit
                                    # before it); None = none here: run every segment, answer nothing
    policy: ExitPolicy = FIXED_POLICY
    sampling: SamplingParams = GREEDY
    evaluate: bool = True           # False: only extend caches (a chunk of a longer prefill)
    keep_logits: bool = False       # return every evaluated exit's logits at every row it ran (tests, verify)
    tail: int = 1                   # sent deeper: rows at the end whose deepest-exit features are kept for a
                                    # degraded answer (a speculative verify keeps its k+1 rows)


@dataclass
class SeqOut:
    exit: int | None                # global exit that answered; None: not answered here (go deeper / fill)
    token: int = -1
    confidence: list[tuple[int, float, float, float]] = field(default_factory=list)  # (exit, max_prob, entropy, margin)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # keep_logits: exit -> (rows, V)


@dataclass
class StageOut:
    seqs: list[SeqOut]
    fallback_rows: list[int] = field(default_factory=list)   # sequences that passed the deepest exit unanswered
    fallback_x: torch.Tensor | None = None                   # (sum(counts), D) their features there
    fallback_counts: list[int] = field(default_factory=list) # rows of each in fallback_x (empty: one each)


class AttnMeta:
    """Where a segment's packed rows live in the pool: host lists for bookkeeping, device tensors for the
    kernels (made on first use; a CUDA graph passes its own static ones)."""

    def __init__(self, slots: list[int], offs: list[int], counts: list[int], device):
        self.slots, self.offs, self.counts, self.device = slots, offs, counts, torch.device(device)
        n = 0
        while n < len(counts) and counts[n] == 1:
            n += 1
        self.n_dec = n                      # leading sequences with exactly one row (the decode kernel's part)
        cu = [0]
        for c in counts:
            cu.append(cu[-1] + c)
        self.cu, self.max_count = cu, max(counts) if counts else 0
        self._t: dict | None = None

    @classmethod
    def static(cls, pos: torch.Tensor, slots: torch.Tensor, cu: torch.Tensor) -> "AttnMeta":
        """n decode rows (one per sequence) described by device tensors only (CUDA graph capture)."""
        n = pos.shape[0]
        m = cls.__new__(cls)
        m.slots, m.offs, m.counts, m.device = None, None, [1] * n, pos.device
        m.n_dec, m.cu, m.max_count = n, list(range(n + 1)), 1
        offs = pos.to(torch.int32)
        m._t = {"slots": slots, "offs": offs, "lens": offs + 1, "cu": cu, "pos": pos, "row_slots": slots}
        return m

    @property
    def t(self) -> dict:
        if self._t is None:
            i32 = dict(dtype=torch.int32, device=self.device)
            rows = [(s, o + j) for s, o, c in zip(self.slots, self.offs, self.counts) for j in range(c)]
            self._t = {"slots": torch.tensor(self.slots, **i32), "offs": torch.tensor(self.offs, **i32),
                       "lens": torch.tensor([o + c for o, c in zip(self.offs, self.counts)], **i32),
                       "cu": torch.tensor(self.cu, **i32),
                       "pos": torch.tensor([p for _, p in rows], dtype=torch.int64, device=self.device),
                       "row_slots": torch.tensor([s for s, _ in rows], **i32)}
            if 0 < self.n_dec < len(self.counts):  # the prefill part, rows cu[n]..N, with its own cu_seqlens
                self._t["cu_pre"] = self._t["cu"][self.n_dec:] - self.cu[self.n_dec]
        return self._t

    @property
    def n_rows(self) -> int:
        return self.cu[-1]


def attend_written(kc, vc, m: AttnMeta, q_NHE, n_kv: int):
    """Attention of packed queries over a pool layer whose new K/V are already written (the fused
    path): decode kernel for the leading one-row sequences, prefill kernel for the rest."""
    t, n = m.t, m.n_dec

    def dec(q, slots, lens):
        return kernels.decode_attention(q[:, None], kc, vc, lens, cache_slots=slots)[:, 0]

    def pre(q, cu, offs, slots):
        kv = q[:, :n_kv]  # shapes only: kv_written
        return kernels.prefill_attention(q, kv, kv, cu_seqlens=cu, k_cache=kc, v_cache=vc, cache_offsets=offs,
                                         cache_slots=slots, max_seqlen=m.max_count, kv_written=True)
    if n == len(m.counts):
        return dec(q_NHE, t["slots"], t["lens"])
    if n == 0:
        return pre(q_NHE, t["cu"], t["offs"], t["slots"])
    return torch.cat([dec(q_NHE[:n], t["slots"][:n], t["lens"][:n]),
                      pre(q_NHE[n:], t["cu_pre"], t["offs"][n:], t["slots"][n:])], dim=0)


class PoolAttend:
    """attend(q, k, v) for one cached layer: write the new rows' K/V into the pool, attend over the cache."""

    def __init__(self, pool: KVPool, idx: int, meta: AttnMeta):
        self.kc, self.vc, self.m = pool.k[idx], pool.v[idx], meta

    def __call__(self, q_NHE, k_NKE, v_NKE):
        m, t = self.m, self.m.t
        n = m.n_dec
        if n == len(m.counts):  # every sequence decodes one token
            return self._decode(q_NHE, k_NKE, v_NKE, t["slots"], t["offs"], t["lens"], t["cu"])
        if n == 0:
            return kernels.prefill_attention(q_NHE, k_NKE, v_NKE, cu_seqlens=t["cu"], k_cache=self.kc, v_cache=self.vc,
                                             cache_offsets=t["offs"], cache_slots=t["slots"], max_seqlen=m.max_count)
        o_dec = self._decode(q_NHE[:n], k_NKE[:n], v_NKE[:n], t["slots"][:n], t["offs"][:n], t["lens"][:n],
                             t["cu"][:n + 1])
        o_pre = kernels.prefill_attention(q_NHE[n:], k_NKE[n:], v_NKE[n:], cu_seqlens=t["cu_pre"], k_cache=self.kc,
                                          v_cache=self.vc, cache_offsets=t["offs"][n:], cache_slots=t["slots"][n:],
                                          max_seqlen=m.max_count)
        return torch.cat([o_dec, o_pre], dim=0)

    def _decode(self, q_NHE, k_NKE, v_NKE, slots, offs, lens, cu):
        kernels.write_kv_cache(self.kc, self.vc, k_NKE, v_NKE, offs, cu_seqlens=cu, cache_slots=slots, max_seqlen=1)
        return kernels.decode_attention(q_NHE[:, None], self.kc, self.vc, lens, cache_slots=slots)[:, 0]


class Stage:
    """Exits `exits` (consecutive global indices) of a family: their trunk layers, branch layers and heads.

    `model` may be a partial FamilyModel (deploy's shards build one with only the held layers);
    `unembed` maps each held exit to its (V, D) matrix; `has_next`: a deeper tier exists, so the state
    at the stage's output boundary is logged for it (and for replay after it loses a sequence).
    """

    def __init__(self, model: FamilyModel, exits: list[int], *, unembed: dict[int, torch.Tensor] | None = None,
                 has_embedding: bool | None = None, has_next: bool | None = None, fused: bool | None = None):
        cfg = model.cfg
        if not exits or exits != list(range(exits[0], exits[-1] + 1)) or exits[0] < 0 or exits[-1] >= cfg.G:
            raise StageError(f"a stage holds consecutive exits of 0..{cfg.G - 1}, got {exits}")
        self.model, self.cfg, self.exits = model, cfg, list(exits)
        self.start_layer = 0 if exits[0] == 0 else cfg.exits[exits[0] - 1]
        self.stop_layer = cfg.exits[exits[-1]]
        self.has_embedding = exits[0] == 0 if has_embedding is None else has_embedding
        self.is_last = exits[-1] == cfg.G - 1
        self.has_next = (not self.is_last) if has_next is None else has_next
        self.deepest_exit = exits[-1]
        self.unembed = unembed if unembed is not None else {g: model.unembed_weight(g) for g in exits}
        bounds = [self.start_layer] + [cfg.exits[g] for g in exits]
        self.segments = [(bounds[s], bounds[s + 1], g) for s, g in enumerate(exits)]  # (a, b, exit)
        ids = list(range(self.start_layer, self.stop_layer))
        for g in exits:
            ids += [i for i, _ in model.branch_blocks(g)]
        self.layer_ids = ids
        self._idx = {lid: k for k, lid in enumerate(ids)}       # global layer id -> pool layer index
        self.n_logs = len(exits) - 1 + int(self.has_next)      # internal boundaries + the output boundary
        p = next(iter(self.unembed.values()))
        self.device, self.dtype = p.device, p.dtype
        # CUDA: blocks run as trunk/fused.py's fused kernels (same weights, views of fused buffers)
        self.fused = {}
        if (self.device.type == "cuda") if fused is None else fused:
            from trunk.fused import fuse_block
            blocks = [(i, model.layers[i]) for i in range(self.start_layer, self.stop_layer)]
            blocks += [b for g in exits for b in model.branch_blocks(g)]
            self.fused = {lid: fuse_block(blk) for lid, blk in blocks}
        self.graphs = None  # trunk.cuda_graphs.DecodeGraphs, attached by the engine on CUDA

    # ---- pool ----------------------------------------------------------------------------------
    def pool_shape(self, max_len: int | None = None) -> PoolShape:
        cfg = self.cfg
        return PoolShape(len(self.layer_ids), cfg.n_kv_heads, cfg.head_dim, self.n_logs, cfg.d_model,
                         min(max_len or cfg.max_seq_len, cfg.max_seq_len), self.dtype)

    def log_index(self, s: int) -> int | None:
        """Pool log of the boundary after local segment s (None: not logged)."""
        if s < len(self.exits) - 1:
            return s
        return s if self.has_next else None

    def local(self, g: int) -> int:
        return g - self.exits[0]

    # ---- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, x: torch.Tensor, runs: list[SeqRun], pool: KVPool) -> StageOut:
        """x: token ids (N,) on the first stage, else boundary states (N, D); rows packed by sequence.
        Each run's seg_lens is updated in place to what the segments hold afterwards."""
        self._check(x, runs, pool)
        whole = self._whole_step(x if self.has_embedding else x.to(self.device, self.dtype), runs)
        if whole is not None:
            return whole
        h = x.to(self.device) if self.has_embedding else x.to(self.device, self.dtype)
        ends = [r.start + r.count for r in runs]
        n_seg = len(self.segments)
        depth = [n_seg - 1 if r.want is None or r.want > self.deepest_exit else self.local(r.want) for r in runs]
        outs = [SeqOut(None) for _ in runs]
        active, rows_from = list(range(len(runs))), [r.start for r in runs]
        fallback: tuple[list[int], torch.Tensor] | None = None
        may_eval = [False] * n_seg  # segments where some sequence is evaluated (one pass over the runs)
        for r in runs:
            if r.evaluate and r.want is not None:
                last = min(self.local(r.want), n_seg - 1) if r.want >= self.exits[0] else -1
                if r.policy.kind != FIXED:
                    may_eval[:last + 1] = [True] * (last + 1)
                elif r.want <= self.deepest_exit:
                    may_eval[last] = True
        for s, (a, b, g) in enumerate(self.segments):
            if s > 0:
                keep = [i for i in active if depth[i] >= s and outs[i].exit is None]
                if not keep:
                    break
                h, rows_from = self._rows(s, h, active, keep, runs, ends, pool, rows_from)
                active = keep
            meta = AttnMeta([runs[i].slot for i in active], rows_from,
                            [ends[i] - rows_from[j] for j, i in enumerate(active)], self.device)
            ev = [j for j, i in enumerate(active) if evaluated_at(runs[i], g)] if may_eval[s] else []
            h, xb, logits = self._segment(s, h, meta, pool, head=bool(ev))
            for i in active:
                runs[i].seg_lens[s] = ends[i]
            self._evaluate(g, active, ev, meta.cu, xb, logits, runs, outs)
            if s == n_seg - 1:
                fwd = [j for j, i in enumerate(active) if outs[i].exit is None and runs[i].evaluate]
                if fwd and self.has_next:
                    tails = [min(runs[active[j]].tail, meta.cu[j + 1] - meta.cu[j]) for j in fwd]
                    idx = torch.tensor([r for j, n in zip(fwd, tails) for r in range(meta.cu[j + 1] - n, meta.cu[j + 1])],
                                       device=self.device)
                    fallback = ([active[j] for j in fwd], self.model.head_features(g, xb.index_select(0, idx)), tails)
        out = StageOut(outs)
        if fallback is not None:
            out.fallback_rows, out.fallback_x, counts = fallback
            out.fallback_counts = counts if any(n != 1 for n in counts) else []
        return out

    def _whole_step(self, x, runs: list[SeqRun]) -> StageOut | None:
        """The common decode step as one CUDA graph over every segment: each sequence brings one row,
        nothing is pending deeper, and all answer at the deepest exit here (or all go past it)."""
        g_last, n_seg = self.deepest_exit, len(self.segments)
        if self.graphs is None or n_seg == 1 or not runs:
            return None
        head = runs[0].want == g_last
        for r in runs:
            if (r.count != 1 or not r.evaluate or r.policy.kind != FIXED or r.want is None
                    or (r.want == g_last) != head or r.want < g_last or r.keep_logits):
                return None
            lens = r.seg_lens
            if lens[-1] != r.start or lens[0] != r.start:  # pending positions somewhere: the general path
                return None
        meta = AttnMeta([r.slot for r in runs], [r.start for r in runs], [1] * len(runs), self.device)
        got = self.graphs.run("all", x, meta, head)
        if got is None:
            return None
        _, xb, logits, tok = got
        for r in runs:
            r.seg_lens[:] = [r.start + 1] * n_seg
        outs = [SeqOut(None) for _ in runs]
        out = StageOut(outs)
        if head and all(r.sampling.greedy for r in runs):  # the graph's argmax is the answer
            for o, t in zip(outs, tok.tolist()):
                o.exit, o.token = g_last, t
        elif head:
            decide(g_last, logits, list(range(len(runs))), runs, outs)
        elif self.has_next:
            out.fallback_rows, out.fallback_x = list(range(len(runs))), self.model.head_features(g_last, xb)
        return out

    def decode_burst(self, x, runs: list[SeqRun], k: int) -> list[list[int]] | None:
        """k greedy decode steps for sequences that each bring one token and answer at one of this
        stage's exits, nothing pending in the segments they use (CUDA graphs; a last stage when the
        exits differ): step j's tokens are the inputs of step j+1. Returns tokens[j][i] (run i's answer
        at step j), with the seg_lens of the segments each run uses advanced by k (deeper ones stay
        pending); or None (nothing run) when the batch is not such a case -- the caller steps once
        instead. The caller keeps what it uses: positions past a sequence's kept tokens hold KV it
        must not count (truncate seg_lens to them)."""
        g_last = self.deepest_exit
        if self.graphs is None or not runs or not self.has_embedding or k < 1:
            return None
        segs = []
        for r in runs:
            if (r.count != 1 or not r.evaluate or r.policy.kind != FIXED or r.want not in self.exits
                    or r.keep_logits or not r.sampling.greedy):
                return None
            s = self.local(r.want)
            if any(n != r.start for n in r.seg_lens[:s + 1]):
                return None
            segs.append(s)
        last = len(self.segments) - 1
        mixed = any(g != last for g in segs)
        if mixed and (self.has_next or max(segs) != last):  # all shallower: segment graphs, one step
            return None
        meta = AttnMeta([r.slot for r in runs], [r.start for r in runs], [1] * len(runs), self.device)
        toks = self.graphs.run_burst(x, meta, k, row_seg=segs if mixed else None)
        if toks is None:
            return None
        for r, s in zip(runs, segs):
            r.seg_lens[:s + 1] = [r.start + k] * (s + 1)
        return toks.tolist()

    def _segment(self, s: int, h, meta: AttnMeta, pool: KVPool, head: bool):
        """Segment s on packed rows: (trunk state at its exit, branch output, head logits if `head`).
        One-row-per-sequence batches replay a captured CUDA graph when one fits."""
        if self.graphs is not None and meta.n_dec == len(meta.counts):
            out = self.graphs.run(s, h, meta, head)
            if out is not None:
                return out[:3]
        if s == 0 and self.has_embedding:
            h = self.model.embed(h)
        return self.segment_math(s, h, meta, pool, head)

    def segment_math(self, s: int, h, meta: AttnMeta, pool: KVPool, head: bool):
        """The eager body of a segment (also what a CUDA graph captures): blocks, the boundary log, the
        exit's branch layers and, with `head`, its logits for every row."""
        a, b, g = self.segments[s]
        pos = meta.t["pos"]
        cos = sin = None
        if not self.fused:  # the fused kernels read the tables by position themselves
            cos, sin = self.model.rope_cos[pos][:, None], self.model.rope_sin[pos][:, None]  # (N, 1, E)
        branch = [lid for lid, _ in self.model.branch_blocks(g)]
        norm = self.model.norm if g == self.cfg.G - 1 else self.model.heads[g].norm
        plain = g == self.cfg.G - 1 or self.model.heads[g].adapter is None
        feats = None
        if self.fused and head and not branch and plain and b > a:  # last block's residual add + exit norm: one kernel
            h, delta = self._blocks(list(range(a, b)), h, cos, sin, meta, pool, add=False)
            h, feats = kernels.add_rmsnorm(h, delta, norm.weight, eps=norm.eps)
        else:
            h = self._blocks(list(range(a, b)), h, cos, sin, meta, pool)
        li = self.log_index(s)
        if li is not None:
            flat = meta.t["row_slots"].to(torch.int64) * pool.shape.max_len + pos
            pool.logs[li].view(-1, pool.shape.d_model).index_copy_(0, flat, h.to(pool.logs.dtype))
        xb = self._blocks(branch, h, cos, sin, meta, pool)
        logits = None
        if head:
            feats = self.model.head_features(g, xb) if feats is None else feats
            logits = kernels.linear_1row(feats, self.unembed[g]) if self.fused else F.linear(feats, self.unembed[g])
        return h, xb, logits

    def _blocks(self, layer_ids: list[int], h, cos, sin, meta: AttnMeta, pool: KVPool, add: bool = True):
        """The blocks on packed rows; fused with add=False: (h, delta), the last block's output not yet added."""
        if not layer_ids:
            return h
        if not self.fused:
            for lid in layer_ids:
                blk = self.model.layers[lid] if lid < self.cfg.n_layers else self._branch(lid)
                h = blk(h, cos, sin, PoolAttend(pool, self._idx[lid], meta))
            return h
        from trunk.fused import block_step

        delta, pos, rs = None, meta.t["pos"], meta.t["row_slots"]
        c2, s2 = self.model.rope_cos, self.model.rope_sin
        for lid in layer_ids:
            k = self._idx[lid]
            kc, vc = pool.k[k], pool.v[k]
            h, delta = block_step(self.fused[lid], h, delta, c2, s2, pos, rs, kc, vc,
                                  lambda q, kc=kc, vc=vc: attend_written(kc, vc, meta, q, self.cfg.n_kv_heads))
        return h + delta if add else (h, delta)

    def _branch(self, lid: int):
        cfg = self.cfg
        g, j = divmod(lid - cfg.n_layers, cfg.branch_layers)
        return self.model.heads[g].branch[j]

    def fallback_tokens(self, out: StageOut, rows: list[int], runs: list[SeqRun]) -> dict[int, SeqOut]:
        """Degraded answers from the stage's deepest exit for sequences `rows` that were sent deeper."""
        pick = [_fallback_span(out, out.fallback_rows.index(i))[1] - 1 for i in rows]
        if not pick:
            return {}
        g = self.deepest_exit
        logits = F.linear(out.fallback_x[pick], self.unembed[g]).float()
        stats = confidence(logits).tolist()
        toks = sample(logits, [runs[i].sampling for i in rows], [runs[i].start + runs[i].count - 1 for i in rows])
        return {i: SeqOut(g, t, [(g, *st)]) for i, t, st in zip(rows, toks, stats)}

    def fallback_logits(self, out: StageOut, i: int) -> torch.Tensor:
        """(n, V) float32 logits of the deepest exit at the kept tail rows of sequence i (a degraded
        verify); n <= its run's `tail`: the rows the last segment ran in this call."""
        a, b = _fallback_span(out, out.fallback_rows.index(i))
        return F.linear(out.fallback_x[a:b], self.unembed[self.deepest_exit]).float()

    # ---- pieces --------------------------------------------------------------------------------
    def _check(self, x, runs: list[SeqRun], pool: KVPool) -> None:
        S = pool.shape.max_len
        n = sum(r.count for r in runs)
        if x.shape[0] != n:
            raise StageError(f"{x.shape[0]} input rows for sequences bringing {n}")
        for r in runs:
            if r.count < 1 or r.start < 0 or r.start + r.count > S:
                raise StageError(f"positions [{r.start}, {r.start + r.count}) outside the pool's [0, {S})")
            if r.want is not None and r.want < self.exits[0]:
                raise StageError(f"exit {r.want} is shallower than this stage's exits {self.exits}")
            if len(r.seg_lens) != len(self.segments) or r.seg_lens[0] != r.start:
                raise StageError(f"segment lengths {r.seg_lens} do not start at position {r.start}")

    def _rows(self, s, h, active, keep, runs, ends, pool, rows_from):
        """Input rows of segment s: each kept sequence's positions [seg_lens[s], end), pending first.
        The rows just computed when they are exactly those; else one gather from boundary log s-1."""
        starts = [runs[i].seg_lens[s] for i in keep]
        if keep == active and starts == rows_from:
            return h, starts
        for p, i in zip(starts, keep):
            if p > runs[i].seg_lens[s - 1]:
                raise StageError(f"segment {s} holds {p} positions, more than segment {s - 1} before it")
        log = pool.logs[s - 1].view(-1, pool.shape.d_model)  # (n_slots * S, D)
        S = pool.shape.max_len
        idx = [runs[i].slot * S + q for p, i in zip(starts, keep) for q in range(p, ends[i])]
        return log.index_select(0, torch.tensor(idx, device=self.device)), starts

    def _evaluate(self, g, active, ev, cu, xb, logits, runs, outs) -> None:
        """Exit g for the sequences evaluated here (ev: their indices in `active`): `decide` on the logits
        at each one's last row; keep_logits runs also get every row's."""
        if not ev:
            return
        for j in ev:
            if runs[active[j]].keep_logits:
                outs[active[j]].logits[g] = logits[cu[j]:cu[j + 1]].float()
        rows = [cu[j + 1] - 1 for j in ev]
        sel = logits if rows == list(range(logits.shape[0])) else logits.index_select(
            0, torch.tensor(rows, device=self.device))
        decide(g, sel, [active[j] for j in ev], runs, outs)


def _fallback_span(out: StageOut, j: int) -> tuple[int, int]:
    """Rows [a, b) of out.fallback_x that belong to the j-th fallback sequence."""
    if not out.fallback_counts:
        return j, j + 1
    a = sum(out.fallback_counts[:j])
    return a, a + out.fallback_counts[j]


def evaluated_at(r: SeqRun, g: int) -> bool:
    """Exit g's head runs for this sequence: it is the exit asked for, or a confidence policy checks it."""
    if not r.evaluate or r.want is None:
        return False
    return r.want == g or (r.policy.kind != FIXED and g <= r.want)


def decide(g: int, logits_nV: torch.Tensor, idx: list[int], runs: list[SeqRun], outs: list[SeqOut]) -> None:
    """Sequences idx (evaluated at exit g, logits at their last row): statistics, the exit policy, and
    one batched sampling call for those that answer here."""
    logits_nV = logits_nV.float()
    need = any(runs[i].policy.kind != FIXED for i in idx)  # statistics only where a policy reads them
    stats = confidence(logits_nV).tolist() if need else None
    answer = []
    for k, i in enumerate(idx):
        if stats is not None:
            outs[i].confidence.append((g, *stats[k]))
        if runs[i].want == g or (stats is not None and passes(runs[i].policy, stats[k])):
            answer.append(k)
    if not answer:
        return
    who = [idx[k] for k in answer]
    toks = sample(logits_nV[answer] if len(answer) < len(idx) else logits_nV,
                  [runs[i].sampling for i in who], [runs[i].start + runs[i].count - 1 for i in who])
    for i, t in zip(who, toks):
        outs[i].exit, outs[i].token = g, t


def stage_from_model(model: FamilyModel, exits: list[int] | None = None, *, has_next: bool | None = None) -> Stage:
    """A stage over an in-memory model (default: every exit: the whole family in one process)."""
    return Stage(model, list(range(model.cfg.G)) if exits is None else list(exits), has_next=has_next)
