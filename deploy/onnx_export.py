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

from deploy.manifest import MANIFEST, ShardError, check_file, file_record, read_manifest, tier_entry, write_manifest
from deploy.shards import StageOut, TierStage, load_tier
from trunk.kv_cache import CacheError
from trunk.model import apply_rope
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
def _block(blk, h_BTD, cos_TE, sin_TE, mask_TS, past_k_BKPE, past_v_BKPE):
    """trunk.model.Block with explicit attention over [past, new] keys; (h, present_k, present_v)."""
    att = blk.self_attn
    B, T, _ = h_BTD.shape
    H, K, E = att.n_heads, att.n_kv, att.head_dim
    x_BTD = blk.input_layernorm(h_BTD)
    q_BHTE = apply_rope(att.q_proj(x_BTD).view(B, T, H, E).transpose(1, 2), cos_TE, sin_TE)
    k_BKTE = apply_rope(att.k_proj(x_BTD).view(B, T, K, E).transpose(1, 2), cos_TE, sin_TE)
    v_BKTE = att.v_proj(x_BTD).view(B, T, K, E).transpose(1, 2)
    k_BKSE = torch.cat([past_k_BKPE, k_BKTE], dim=2)
    v_BKSE = torch.cat([past_v_BKPE, v_BKTE], dim=2)
    S = k_BKSE.shape[2]
    # GQA: query head h reads kv head h // (H/K), as SDPA's enable_gqa does
    kx_BHSE = k_BKSE[:, :, None].expand(B, K, H // K, S, E).reshape(B, H, S, E)
    vx_BHSE = v_BKSE[:, :, None].expand(B, K, H // K, S, E).reshape(B, H, S, E)
    # softmax(q k^T / sqrt(E) + mask) v, mask = 0 where key position <= query position else -inf
    s_BHTS = torch.matmul(q_BHTE, kx_BHSE.transpose(-1, -2)) * (1.0 / math.sqrt(E)) + mask_TS
    y_BHTE = torch.matmul(torch.softmax(s_BHTS, dim=-1), vx_BHSE)
    h_BTD = h_BTD + att.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, H * E))
    h_BTD = h_BTD + blk.mlp(blk.post_attention_layernorm(h_BTD))
    return h_BTD, k_BKSE, v_BKSE


class OnnxGraph(nn.Module):
    """The tier as one pure function of (input, pos, past KV...) for torch.onnx.export."""

    def __init__(self, stage: TierStage):
        super().__init__()
        self.stage, self.cfg, self.model = stage, stage.cfg, stage.model
        self.layer_names = cache_layers(stage)
        # an exit tied to the embedding this tier holds reads that matrix (one copy in the graph)
        embed_ptr = self.model.embed.weight.data_ptr() if stage.has_embedding else None
        self.unembed_from_embed = [stage.unembed_VD[g].data_ptr() == embed_ptr for g in stage.exits]
        self.unembed = nn.ParameterList(nn.Parameter(stage.unembed_VD[g], requires_grad=False)
                                        for g, tied in zip(stage.exits, self.unembed_from_embed) if not tied)

    def forward(self, x, pos, *past):
        st, m = self.stage, self.model
        past_kv = {n: (past[2 * i], past[2 * i + 1]) for i, n in enumerate(self.layer_names)}
        present: dict[str, tuple] = {}
        h_BTD = m.embed(x) if st.has_embedding else x
        T = h_BTD.shape[1]
        q_pos_T = pos + torch.arange(T, dtype=torch.int64)
        cos_TE, sin_TE = m.rope_cos[q_pos_T], m.rope_sin[q_pos_T]
        k_pos_S = torch.arange(past[0].shape[2] + T, dtype=torch.int64)
        mask_TS = torch.where(k_pos_S[None, :] <= q_pos_T[:, None], 0.0, float("-inf")).to(h_BTD.dtype)

        def run(blk, name, h):
            h, k, v = _block(blk, h, cos_TE, sin_TE, mask_TS, *past_kv[name])
            present[name] = (k, v)
            return h

        logits, hidden, layer, own = [], [], st.start_layer, iter(self.unembed)
        for idx, g in enumerate(st.exits):
            for i in range(layer, self.cfg.exits[g]):
                h_BTD = run(m.layers[i], f"layers.{i}", h_BTD)
            layer = self.cfg.exits[g]
            if g != st.deepest_exit:
                hidden.append(h_BTD)
            if g == self.cfg.G - 1:
                x_BTD = m.norm(h_BTD)
            else:
                head, x_BTD = m.heads[g], h_BTD
                for j, blk in enumerate(head.branch):
                    x_BTD = run(blk, f"heads.{g}.branch.{j}", x_BTD)
                x_BTD = head.norm(x_BTD)
                x_BTD = head.adapter(x_BTD) if head.adapter is not None else x_BTD
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


def export_tier(shards_dir, tier: str = "device", *, opset: int = OPSET) -> dict:
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
    entry = {"file": path.name, **file_record(path), "opset": opset, "dtype": "float32",
             "inputs": ins, "outputs": outs, "cache_layers": graph.layer_names,
             "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
    _update_manifest(d, tier, entry)
    return entry


def _update_manifest(d: Path, tier: str, entry: dict) -> None:
    m, _ = read_manifest(d)
    m.setdefault("onnx", {})[tier] = entry
    write_manifest(d, m)


# ---- running it ------------------------------------------------------------------------------------
class OnnxKVCache:
    """Per-session KV for an ONNX tier: numpy arrays (B, K, S, E) per cached layer, contiguous appends."""

    def __init__(self, layer_names: list[str], n_kv: int, head_dim: int, max_tokens: int):
        self.layer_names, self.n_kv, self.head_dim, self.max_tokens = layer_names, n_kv, head_dim, max_tokens
        self.kv: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.length = 0
        self.last: tuple[int, int, dict] | None = None  # (pos, T, logits) of the latest forward

    def past(self, B: int) -> dict[str, np.ndarray]:
        if not self.kv:
            empty = np.zeros((B, self.n_kv, 0, self.head_dim), np.float32)
            self.kv = {n: (empty, empty) for n in self.layer_names}
        return {f"past_{kv}.{n}": self.kv[n][i] for n in self.layer_names for i, kv in enumerate(("key", "value"))}

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.kv = {n: (k[:, :, :length], v[:, :, :length]) for n, (k, v) in self.kv.items()}
            self.length, self.last = length, None

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())


class OnnxTierStage:
    """A tier on ONNX Runtime with TierStage's interface (forward / exit_logits / new_cache)."""

    def __init__(self, shards_dir, tier: str = "device", *, verify: bool = True, providers=None,
                 threads: int = 0):
        import onnxruntime as ort

        d = Path(shards_dir)
        m, cfg = read_manifest(d)
        entries = [m["shards"][k] for k in tier_entry(m, tier)["shards"]]
        info = m.get("onnx", {}).get(tier)
        if info is None:
            raise ShardError(f"{d / MANIFEST}: no ONNX export for tier {tier!r} (run `familial-deploy export-onnx {d} --tier {tier}`)")
        check_file(d / info["file"], info, verify)
        self.tier, self.cfg, self.manifest, self.tokenizer = tier, cfg, m, load_tokenizer(d)
        self.start_layer, self.stop_layer = entries[0]["layers"][0], entries[-1]["layers"][1]
        self.has_embedding, self.is_last = entries[0]["has_embedding"], entries[-1]["is_last"]
        self.exits = [g for e in entries for g in e["exits"]]
        self.deepest_exit = self.exits[-1]
        self.val_loss = {e["index"]: e.get("val_loss") for e in m["exits"] if e["index"] in self.exits}
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.layer_names, self.output_names = info["cache_layers"], info["outputs"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(d / info["file"]), opts,
                                            providers=providers or ["CPUExecutionProvider"])

    def __repr__(self) -> str:
        return f"OnnxTierStage({self.tier!r}, layers [{self.start_layer}, {self.stop_layer}), exits {self.exits})"

    def new_cache(self, max_tokens: int | None = None) -> OnnxKVCache:
        return OnnxKVCache(self.layer_names, self.cfg.n_kv_heads, self.cfg.head_dim, max_tokens or self.cfg.max_seq_len)

    def forward(self, x, pos: int = 0, cache: OnnxKVCache | None = None, *, logits_for=None,
                last_only: bool = False) -> StageOut:
        """As TierStage.forward; ONNX computes every held exit's logits, `logits_for` only filters."""
        cache = cache if cache is not None else self.new_cache()
        x = torch.as_tensor(x)
        B, T = x.shape[:2]
        if pos != cache.length:
            raise CacheError(f"KV append at position {pos} but the cache holds {cache.length} positions")
        if pos + T > min(cache.max_tokens, self.cfg.max_seq_len):
            raise CacheError(f"KV cache limit of {min(cache.max_tokens, self.cfg.max_seq_len)} positions exceeded (would hold {pos + T})")
        feed = {"pos": np.asarray(pos, np.int64), **cache.past(B)}
        if self.has_embedding:
            feed["input_ids"] = x.to(torch.int64).numpy()
        else:
            feed["hidden_in"] = x.detach().to(torch.float32).contiguous().numpy()
        res = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        cache.kv = {n: (res[f"present_key.{n}"], res[f"present_value.{n}"]) for n in self.layer_names}
        cache.length = pos + T
        logits = {g: torch.from_numpy(res[f"logits.{g}"]) for g in self.exits}
        cache.last = (pos, T, logits)
        h_out = torch.from_numpy(res["h_out"])
        hidden = {g: torch.from_numpy(res[f"hidden.{g}"]) for g in self.exits[:-1]}
        hidden[self.deepest_exit] = h_out
        want = self.exits if logits_for is None else [g for g in self.exits if g in set(logits_for)]
        return StageOut(h_out, hidden, {g: logits[g][:, -1:] if last_only else logits[g] for g in want})

    __call__ = forward

    def exit_logits(self, g: int, h_BTD, pos: int = 0, cache: OnnxKVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) of exit g for the positions the latest `forward` on `cache` ran.

        The graph computes every held exit inside `forward`; this returns those logits rather than
        running the head again, so it needs that forward's cache and positions.
        """
        if g not in self.exits:
            raise ValueError(f"tier {self.tier!r} holds exits {self.exits}, not {g}")
        last = cache.last if cache is not None else None
        if last is None or last[0] != pos or last[1] != h_BTD.shape[1]:
            raise ValueError("OnnxTierStage.exit_logits needs the cache and positions of the latest forward")
        return last[2][g]


# ---- check against PyTorch -------------------------------------------------------------------------
def check_tier(shards_dir, tier: str = "device", *, seed: int = 0, tol: float = 1e-4,
               runs=((1, 7, 6), (2, 5, 4), (3, 1, 3))) -> dict:
    """ONNX Runtime vs PyTorch TierStage on random prompts then single-token decode steps, each run a
    (batch, prompt length, decode steps) triple; the max abs diff of h_out and logits, argmax agreement.
    Writes `{tier}.onnx.check.json` and the summary into the manifest's onnx entry."""
    d = Path(shards_dir)
    torch_stage = load_tier(d, tier, dtype=torch.float32)
    onnx_stage = OnnxTierStage(d, tier)
    cfg, gen = torch_stage.cfg, torch.Generator().manual_seed(seed)
    steps, worst_logits, worst_h, argmax_equal = [], 0.0, 0.0, True
    for B, prompt, decode in runs:
        tc, oc = torch_stage.new_cache(), onnx_stage.new_cache()
        pos = 0
        for T in [prompt] + [1] * decode:
            x = (torch.randint(0, cfg.vocab_size, (B, T), generator=gen) if torch_stage.has_embedding
                 else torch.randn(B, T, cfg.d_model, generator=gen))
            a, b = torch_stage.forward(x, pos, tc), onnx_stage.forward(x, pos, oc)
            dh = (a.h_out_BTD - b.h_out_BTD).abs().max().item()
            dl = max((a.exit_logits[g] - b.exit_logits[g]).abs().max().item() for g in torch_stage.exits)
            same = all(torch.equal(a.exit_logits[g].argmax(-1), b.exit_logits[g].argmax(-1)) for g in torch_stage.exits)
            steps.append({"batch": B, "pos": pos, "T": T, "max_abs_diff_logits": dl, "max_abs_diff_h_out": dh,
                          "argmax_equal": same})
            worst_logits, worst_h, argmax_equal = max(worst_logits, dl), max(worst_h, dh), argmax_equal and same
            pos += T
    summary = {"tier": tier, "max_abs_diff": worst_logits, "max_abs_diff_h_out": worst_h,
               "argmax_equal": argmax_equal, "tol": tol, "ok": worst_logits <= tol and argmax_equal,
               "steps": len(steps), "seed": seed, "onnxruntime": _ort_version()}
    report = {"summary": summary, "steps": steps}
    (d / f"{onnx_file(tier)}.check.json").write_text(json.dumps(report, indent=2) + "\n")
    m, _ = read_manifest(d)
    m["onnx"][tier]["check"] = summary
    write_manifest(d, m)
    return report


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
