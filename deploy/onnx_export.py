"""A tier's shards as an ONNX graph with KV-cache inputs/outputs, and a stage that runs it on ONNX Runtime.

Graph `{tier}.onnx` (opset 18, fp32), for positions [pos, pos+T) of a batch of B sequences:
  inputs   input_ids (B, T) int64                 first tier only, else
           hidden_in (B, T, D) float32            the previous tier's h_out
           pos () int64                           position offset = positions already cached (P)
           past_key.{layer}, past_value.{layer}   (B, K, P, E) for every cached layer the tier holds,
                                                  trunk `layers.i` then `heads.g.branch.j`, as `cache_layers`
  outputs  h_out (B, T, D)                        trunk state at stop_layer (what the next tier takes)
           logits.{g} (B, T, V)                   every held exit's logits
           hidden.{g} (B, T, D)                   trunk state at exits[g], for held exits but the deepest
           present_key.{layer}, present_value.{layer}  (B, K, P+T, E): past with the new positions appended
B, T and P are dynamic (P may be 0 for a prefill). The wrapper re-states the decoder block with
explicit attention (GQA by expanding K/V heads, additive causal mask over the offset) because SDPA
with `enable_gqa` does not export; weights, RMSNorm and RoPE are the trunk's own modules/functions,
and `check_tier` holds the graph to PyTorch's `TierStage` over prefill + decode steps.

`OnnxTierStage` answers the same calls as `TierStage` (`forward`, `exit_logits`, `new_cache`) with an
`OnnxKVCache` of numpy arrays. Not here: fp16/int8 graphs, external-data files for graphs over 2 GB.

Legend: B batch, T new positions, P cached positions, S = P+T, D d_model, H/K query/kv heads,
E head dim, V vocab.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deploy.manifest import MANIFEST, OnnxEntry, ShardError, check_file, file_record, read_manifest, write_manifest
from deploy.shards import TierStage, load_tier
from trunk.kv_pool import KVPool, PoolShape
from trunk.stage import SeqOut, SeqRun, StageError, StageOut, decide, evaluated_at
from trunk.tokenizer import load_tokenizer

OPSET = 18


def onnx_file(tier: str) -> str:
    return f"{tier}.onnx"


def cache_layers(stage) -> list[str]:
    """Names of the decoder layers whose KV the tier caches, in graph order."""
    names = [f"layers.{i}" for i in range(stage.start_layer, stage.stop_layer)]
    for g in stage.exits:
        if g < stage.cfg.G - 1:
            names += [f"heads.{g}.branch.{j}" for j in range(stage.cfg.branch_layers)]
    return names


# ---- the exported graph --------------------------------------------------------------------------
class _PastAttend:
    """attend(q, k, v) for one layer in the graph: keys/values = [past, new], explicit softmax attention
    (GQA by expanding K/V heads; SDPA with enable_gqa does not export), present = [past, new]."""

    def __init__(self, past_k_BKPE, past_v_BKPE, mask_TS, present: list):
        self.pk, self.pv, self.mask, self.present = past_k_BKPE, past_v_BKPE, mask_TS, present

    def __call__(self, q_BTHE, k_BTKE, v_BTKE):
        B, T, H, E = q_BTHE.shape
        K = k_BTKE.shape[2]
        k_BKSE = torch.cat([self.pk, k_BTKE.transpose(1, 2)], dim=2)
        v_BKSE = torch.cat([self.pv, v_BTKE.transpose(1, 2)], dim=2)
        self.present.append((k_BKSE, v_BKSE))
        S = k_BKSE.shape[2]
        kx_BHSE = k_BKSE[:, :, None].expand(B, K, H // K, S, E).reshape(B, H, S, E)
        vx_BHSE = v_BKSE[:, :, None].expand(B, K, H // K, S, E).reshape(B, H, S, E)
        # softmax(q k^T / sqrt(E) + mask) v, mask = 0 where key position <= query position else -inf
        s_BHTS = torch.matmul(q_BTHE.transpose(1, 2), kx_BHSE.transpose(-1, -2)) * (1.0 / math.sqrt(E)) + self.mask
        return torch.matmul(torch.softmax(s_BHTS, dim=-1), vx_BHSE).transpose(1, 2)  # (B, T, H, E)


class OnnxGraph(nn.Module):
    """The tier as one pure function of (input, pos, past KV...) for torch.onnx.export: the trunk's own
    blocks and heads (trunk/model.py) walked over the tier's segments, attention over past + new."""

    def __init__(self, stage: TierStage):
        super().__init__()
        self.stage, self.cfg, self.model = stage, stage.cfg, stage.model
        self.layer_names = cache_layers(stage)
        # an exit tied to the embedding this tier holds reads that matrix (one copy in the graph)
        embed_ptr = self.model.embed.weight.data_ptr() if stage.has_embedding else None
        self.unembed_from_embed = [stage.unembed[g].data_ptr() == embed_ptr for g in stage.exits]
        self.unembed = nn.ParameterList(nn.Parameter(stage.unembed[g], requires_grad=False)
                                        for g, tied in zip(stage.exits, self.unembed_from_embed) if not tied)

    def forward(self, x, pos, *past):
        st, m = self.stage, self.model
        past_kv = {n: (past[2 * i], past[2 * i + 1]) for i, n in enumerate(self.layer_names)}
        present: dict[str, tuple] = {}
        h_BTD = m.embed(x) if st.has_embedding else x
        T = h_BTD.shape[1]
        q_pos_T = pos + torch.arange(T, dtype=torch.int64)
        cos, sin = m.rope_cos[q_pos_T][:, None], m.rope_sin[q_pos_T][:, None]  # (T, 1, E)
        k_pos_S = torch.arange(past[0].shape[2] + T, dtype=torch.int64)
        mask_TS = torch.where(k_pos_S[None, :] <= q_pos_T[:, None], 0.0, float("-inf")).to(h_BTD.dtype)

        def run(blk, name, h):
            out: list = []
            h = blk(h, cos, sin, _PastAttend(*past_kv[name], mask_TS, out))
            present[name] = out[0]
            return h

        logits, hidden, own = [], [], iter(self.unembed)
        for idx, (a, b, g) in enumerate(st.segments):
            for i in range(a, b):
                h_BTD = run(m.layers[i], f"layers.{i}", h_BTD)
            if g != st.deepest_exit:
                hidden.append(h_BTD)
            x_BTD = h_BTD
            for j, (_, blk) in enumerate(m.branch_blocks(g)):
                x_BTD = run(blk, f"heads.{g}.branch.{j}", x_BTD)
            x_BTD = m.head_features(g, x_BTD)
            logits.append(F.linear(x_BTD, m.embed.weight if self.unembed_from_embed[idx] else next(own)))
        kv = [t for n in self.layer_names for t in present[n]]
        return (h_BTD, *logits, *hidden, *kv)

    def io_names(self) -> tuple[list[str], list[str]]:
        st = self.stage
        ins = ["input_ids" if st.has_embedding else "hidden_in", "pos"]
        ins += [f"past_{kv}.{n}" for n in self.layer_names for kv in ("key", "value")]
        outs = ["h_out"] + [f"logits.{g}" for g in st.exits] + [f"hidden.{g}" for g in st.exits[:-1]]
        outs += [f"present_{kv}.{n}" for n in self.layer_names for kv in ("key", "value")]
        return ins, outs

    def example(self, B: int = 2, T: int = 3, P: int = 4):
        cfg, st = self.cfg, self.stage
        x = torch.randint(0, cfg.vocab_size, (B, T)) if st.has_embedding else torch.randn(B, T, cfg.d_model)
        past = [torch.randn(B, cfg.n_kv_heads, P, cfg.head_dim) for _ in range(2 * len(self.layer_names))]
        return (x, torch.tensor(P, dtype=torch.int64), *past)


def export_tier(shards_dir, tier: str = "device", *, opset: int = OPSET) -> OnnxEntry:
    """Write `{tier}.onnx` next to the shards and record it in the manifest; the manifest entry."""
    d = Path(shards_dir)
    stage = load_tier(d, tier, dtype=torch.float32)
    graph = OnnxGraph(stage).eval()
    ins, outs = graph.io_names()
    batch, seq, past = torch.export.Dim("batch", max=1 << 16), torch.export.Dim("seq", max=stage.cfg.max_seq_len), \
        torch.export.Dim("past", max=stage.cfg.max_seq_len)
    dyn = ({0: batch, 1: seq}, None, tuple({0: batch, 2: past} for _ in ins[2:]))  # x, pos, *past
    path = d / onnx_file(tier)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and axis-renaming chatter
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(graph, graph.example(), str(tmp), input_names=ins, output_names=outs,
                          dynamic_shapes=dyn, opset_version=opset, dynamo=True, external_data=False,
                          optimize=True, verbose=False)
    tmp.replace(path)
    rec = file_record(path)
    entry = OnnxEntry(rec.file, rec.sha256, rec.bytes, opset=opset, dtype="float32", inputs=ins, outputs=outs,
                      cache_layers=graph.layer_names, exported=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      torch=torch.__version__)
    m = read_manifest(d)
    m.onnx[tier] = entry
    write_manifest(d, m)
    return entry


# ---- running it ------------------------------------------------------------------------------------
class OnnxTierStage:
    """A tier on ONNX Runtime that the tier engine drives like a `trunk.stage.Stage`.

    The graph runs one sequence at a time (a device tier serves one user); every held exit is computed
    on every row, so the tier's segments never lag each other and only its output boundary is logged
    (in the engine's pool, for the next tier). Keys/values live here as numpy arrays per pool slot.
    """

    def __init__(self, shards_dir, tier: str = "device", *, verify: bool = True, providers=None,
                 threads: int = 0):
        import onnxruntime as ort

        d = Path(shards_dir)
        m = read_manifest(d)
        cfg, entries = m.architecture, m.tier_shards(tier)
        info = m.onnx.get(tier)
        if info is None:
            raise ShardError(f"{d / MANIFEST}: no ONNX export for tier {tier!r} (run `familial-deploy export-onnx {d} --tier {tier}`)")
        check_file(d / info.file, info, verify)
        self.tier, self.cfg, self.manifest, self.tokenizer = tier, cfg, m, load_tokenizer(d)
        self.start_layer, self.stop_layer = entries[0].layers[0], entries[-1].layers[1]
        self.has_embedding, self.is_last = entries[0].has_embedding, entries[-1].is_last
        self.has_next = not self.is_last
        self.exits = [g for e in entries for g in e.exits]
        self.deepest_exit = self.exits[-1]
        bounds = [self.start_layer] + [cfg.exits[g] for g in self.exits]
        self.segments = [(bounds[s], bounds[s + 1], g) for s, g in enumerate(self.exits)]
        self.val_loss = m.val_loss(self.exits)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.layer_names, self.output_names = info.cache_layers, info.outputs
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(d / info.file), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.kv: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def __repr__(self) -> str:
        return f"OnnxTierStage({self.tier!r}, layers [{self.start_layer}, {self.stop_layer}), exits {self.exits})"

    def pool_shape(self, max_len: int | None = None) -> PoolShape:
        cfg = self.cfg
        return PoolShape(0, cfg.n_kv_heads, cfg.head_dim, int(self.has_next), cfg.d_model,
                         min(max_len or cfg.max_seq_len, cfg.max_seq_len), torch.float32)

    def log_index(self, s: int) -> int | None:
        return 0 if self.has_next and s == len(self.segments) - 1 else None

    def run_graph(self, x, pos: int, past: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> dict[str, np.ndarray]:
        """One graph call: x (B, T) ids or (B, T, D) states at positions [pos, pos+T) after `past`."""
        x = torch.as_tensor(x)
        B = x.shape[0]
        if not past:
            empty = np.zeros((B, self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
            past = {n: (empty, empty) for n in self.layer_names}
        feed = {"pos": np.asarray(pos, np.int64)}
        feed.update({f"past_{kv}.{n}": past[n][i] for n in self.layer_names for i, kv in enumerate(("key", "value"))})
        if self.has_embedding:
            feed["input_ids"] = x.to(torch.int64).numpy()
        else:
            feed["hidden_in"] = x.detach().to(torch.float32).contiguous().numpy()
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def forward(self, x: torch.Tensor, runs: list[SeqRun], pool: KVPool) -> StageOut:
        outs, fb_rows, fb = [SeqOut(None) for _ in runs], [], []
        row = 0
        for k, r in enumerate(runs):
            past = None if r.start == 0 else self.kv.get(r.slot)
            if r.start > 0:
                if past is None or past[self.layer_names[0]][0].shape[2] < r.start:
                    raise StageError(f"slot {r.slot} holds fewer than {r.start} positions")
                past = {n: (kk[:, :, :r.start], vv[:, :, :r.start]) for n, (kk, vv) in past.items()}
            xs = x[row:row + r.count][None]
            row += r.count
            res = self.run_graph(xs, r.start, past)
            self.kv[r.slot] = {n: (res[f"present_key.{n}"], res[f"present_value.{n}"]) for n in self.layer_names}
            li = self.log_index(len(self.segments) - 1)
            if li is not None:
                pool.logs[li, r.slot, r.start:r.start + r.count] = torch.from_numpy(res["h_out"][0])
            r.seg_lens[:] = [r.start + r.count] * len(self.segments)
            for g in self.exits:
                if outs[k].exit is None and evaluated_at(r, g):
                    if r.keep_logits:
                        outs[k].logits[g] = torch.from_numpy(res[f"logits.{g}"][0])
                    decide(g, torch.from_numpy(res[f"logits.{g}"][0, -1:]), [k], runs, outs)
            if outs[k].exit is None and r.evaluate and self.has_next:
                fb_rows.append(k)
                fb.append(torch.from_numpy(res[f"logits.{self.deepest_exit}"][0, -1]))
        out = StageOut(outs)
        if fb_rows:
            out.fallback_rows, out.fallback_x = fb_rows, torch.stack(fb)  # logits here, not features
        return out

    def fallback_tokens(self, out: StageOut, rows: list[int], runs) -> dict[int, SeqOut]:
        """Degraded answers from the deepest exit's logits for sequences `rows` sent deeper."""
        got = {i: SeqOut(None) for i in rows}
        forced = _Forced(runs, self.deepest_exit)
        for i in rows:
            logits = out.fallback_x[out.fallback_rows.index(i)][None]
            decide(self.deepest_exit, logits, [i], forced, got)
        return got


class _Forced:
    """runs[i] with `want` set to exit g, so `decide` answers there (a degraded answer)."""

    def __init__(self, runs, g: int):
        self.runs, self.g = runs, g

    def __getitem__(self, i):
        r = self.runs[i]
        return SeqRun(r.slot, r.start, r.count, r.seg_lens, want=self.g, sampling=r.sampling)


# ---- check against PyTorch -------------------------------------------------------------------------
def check_tier(shards_dir, tier: str = "device", *, seed: int = 0, tol: float = 1e-4,
               runs=((1, 7, 6), (2, 5, 4), (3, 1, 3))) -> dict:
    """ONNX Runtime vs the same graph in PyTorch (the tier's own blocks) on random prompts then
    single-token decode steps, each run a (batch, prompt length, decode steps) triple: the max abs diff
    of h_out and logits, argmax agreement. Writes `{tier}.onnx.check.json` and the summary into the
    manifest's onnx entry."""
    d = Path(shards_dir)
    graph = OnnxGraph(load_tier(d, tier, dtype=torch.float32)).eval()
    onnx_stage = OnnxTierStage(d, tier)
    cfg, gen = onnx_stage.cfg, torch.Generator().manual_seed(seed)
    steps, worst_logits, worst_h, argmax_equal = [], 0.0, 0.0, True
    n_out = len(onnx_stage.output_names)
    for B, prompt, decode in runs:
        past_t, past_o, pos = None, None, 0
        for T in [prompt] + [1] * decode:
            x = (torch.randint(0, cfg.vocab_size, (B, T), generator=gen) if onnx_stage.has_embedding
                 else torch.randn(B, T, cfg.d_model, generator=gen))
            if past_t is None:
                past_t = [torch.zeros(B, cfg.n_kv_heads, 0, cfg.head_dim) for _ in range(2 * len(graph.layer_names))]
            with torch.no_grad():
                a = dict(zip(onnx_stage.output_names, graph(x, torch.tensor(pos), *past_t)))
            b = onnx_stage.run_graph(x, pos, past_o)
            assert len(a) == n_out
            past_t = [a[f"present_{kv}.{n}"] for n in graph.layer_names for kv in ("key", "value")]
            past_o = {n: (b[f"present_key.{n}"], b[f"present_value.{n}"]) for n in graph.layer_names}
            dh = float(np.abs(a["h_out"].numpy() - b["h_out"]).max())
            dl = max(float(np.abs(a[f"logits.{g}"].numpy() - b[f"logits.{g}"]).max()) for g in onnx_stage.exits)
            same = all(np.array_equal(a[f"logits.{g}"].numpy().argmax(-1), b[f"logits.{g}"].argmax(-1))
                       for g in onnx_stage.exits)
            steps.append({"batch": B, "pos": pos, "T": T, "max_abs_diff_logits": dl, "max_abs_diff_h_out": dh,
                          "argmax_equal": same})
            worst_logits, worst_h, argmax_equal = max(worst_logits, dl), max(worst_h, dh), argmax_equal and same
            pos += T
    summary = {"tier": tier, "max_abs_diff": worst_logits, "max_abs_diff_h_out": worst_h,
               "argmax_equal": argmax_equal, "tol": tol, "ok": worst_logits <= tol and argmax_equal,
               "steps": len(steps), "seed": seed, "onnxruntime": _ort_version()}
    report = {"summary": summary, "steps": steps}
    (d / f"{onnx_file(tier)}.check.json").write_text(json.dumps(report, indent=2) + "\n")
    m = read_manifest(d)
    m.onnx[tier] = dataclasses.replace(m.onnx[tier], check=summary)
    write_manifest(d, m)
    return report


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
