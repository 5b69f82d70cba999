"""Stage shards: split a checkpoint into G shards, and load a tier's shards as a runnable stage.

Shard k holds trunk layers [exits[k-1], exits[k]) and exit head k; shard 0 also holds the embedding,
the last shard the final norm and LM head. Tensors keep their checkpoint names (`layers.3.mlp...`,
`heads.1.norm.weight`, `norm.weight`); an unembedding tied to another shard's matrix is copied in
under the head's own name (`heads.{g}.unembed.weight`, or `lm_head.weight` for the final head), so a
shard never needs a tensor from another shard. The manifest's `unembed` map names each exit's matrix.

A tier (one or more consecutive shards) loads as a `TierStage`, a `trunk.stage.Stage` over a trunk
`FamilyModel` built on the meta device with only the held layers and heads materialised, so a node's
memory is its shard. The stage loop is the trunk's own; this file adds no numerics.
Sessions, eviction and the wire belong to `relay/`; ONNX to `deploy/onnx_export.py`.

Legend: B batch, T positions, D d_model, V vocab.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

from deploy.manifest import (FORMAT, MANIFEST, ExitEntry, Manifest, ShardEntry, ShardError, Source, TierEntry, TokenizerInfo,
                             check_file, default_tiers, file_record, parse_tier_spec, read_manifest, shard_file,
                             write_manifest)
from trunk.artifacts import confined
from trunk.checkpoint import DTYPES, META, WEIGHTS, load_checkpoint, read_meta
from trunk.config import FamilyConfig
from trunk.model import FamilyModel, rope_tables
from trunk.stage import Stage
from trunk.tokenizer import TokenizerError, load_tokenizer

_NAMES = {v: k for k, v in DTYPES.items()}


# ---- layout ------------------------------------------------------------------------------------
def _meta_model(cfg: FamilyConfig) -> FamilyModel:
    with torch.device("meta"):
        return FamilyModel(cfg)


def shard_layout(cfg: FamilyConfig, k: int) -> tuple[dict[str, str], dict[int, str]]:
    """({shard tensor name: checkpoint tensor name}, {exit g: name of its unembedding in the shard})."""
    G, bounds = cfg.G, (0,) + cfg.exits
    final_src = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    names = list(_meta_model(cfg).state_dict())
    prefixes = [f"layers.{i}." for i in range(bounds[k], bounds[k + 1])]
    if k < G - 1:
        prefixes.append(f"heads.{k}.")
    src = {n: n for n in names if n.startswith(tuple(prefixes))}
    if k == 0:
        src["embed.weight"] = "embed.weight"
    if k == G - 1:
        src["norm.weight"] = "norm.weight"
    unembed_name = "lm_head.weight" if k == G - 1 else f"heads.{k}.unembed.weight"
    if unembed_name not in src:  # tied: borrow the final matrix, unless this shard already holds it
        if final_src in src:
            unembed_name = final_src
        else:
            src[unembed_name] = final_src
    return src, {k: unembed_name}


def expected_shapes(cfg: FamilyConfig, k: int) -> dict[str, tuple[int, ...]]:
    full = {n: tuple(t.shape) for n, t in _meta_model(cfg).state_dict().items()}
    full["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    return {n: full[src] for n, src in shard_layout(cfg, k)[0].items()}


# ---- split ---------------------------------------------------------------------------------------
def split_checkpoint(ckpt_dir, out_dir, tiers: str | None = None, dtype: str | None = None) -> Manifest:
    """Write shard-{k}.safetensors, the tokenizer files and manifest.json into out_dir; the manifest."""
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt_dir), Path(out_dir)
    meta = read_meta(ckpt)
    tok_names = meta.get("tokenizer", {}).get("files", [])
    for name in tok_names:  # a crafted family.json must not make split read or write outside the two dirs
        confined(ckpt, name, ShardError, what="tokenizer file")
        confined(out, name, ShardError, what="tokenizer file")
    dtype = dtype or meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ShardError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    model, tokenizer, meta = load_checkpoint(ckpt, dtype=DTYPES[dtype])
    cfg = model.cfg
    tier_list = parse_tier_spec(tiers or default_tiers(cfg.G), cfg.G)
    tier_of = {k: name for name, ks in tier_list for k in ks}
    sd = model.state_dict()
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the manifest is back
    shards = []
    for k in range(cfg.G):
        src, unembed = shard_layout(cfg, k)
        tensors = {n: sd[s].detach().clone().contiguous() for n, s in src.items()}
        path = out / shard_file(k)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "shard": str(k)})
        tmp.replace(path)
        rec = file_record(path)
        bounds = (0,) + cfg.exits
        shards.append(ShardEntry(k, path.name, tier_of[k], (bounds[k], bounds[k + 1]), [k], k == 0, k == cfg.G - 1,
                                 unembed, dtype, rec.bytes, rec.sha256,
                                 {n: tuple(t.shape) for n, t in sorted(tensors.items())}))
    tok_files = []
    for name in tok_names:
        shutil.copyfile(ckpt / name, out / name)
        tok_files.append(dataclasses.replace(file_record(out / name), file=name))  # may sit in a subfolder
    manifest = Manifest(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source=Source(str(ckpt.resolve()), {WEIGHTS: file_record(ckpt / WEIGHTS), META: file_record(ckpt / META)}),
        architecture=cfg,
        dtype=dtype,
        exits=[ExitEntry.from_dict(e) for e in meta["exits"]],
        tokenizer=TokenizerInfo(meta["tokenizer"]["type"], meta["tokenizer"]["vocab_size"], tok_files),
        tiers=[TierEntry(n, ks) for n, ks in tier_list],
        shards=shards,
    )
    write_manifest(out, manifest)
    return manifest


# ---- verify --------------------------------------------------------------------------------------
def check_shard(directory: Path, entry: ShardEntry, cfg: FamilyConfig, dtype: str, verify_hash: bool = True) -> None:
    """Refuse a shard whose hash, tensor names, shapes or dtype disagree with manifest or architecture."""
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / entry.file
    check_file(path, entry, verify_hash)
    want = expected_shapes(cfg, entry.index)
    listed = entry.tensors
    if listed != want:
        bad = sorted(set(listed) ^ set(want)) or [n for n in want if listed[n] != want[n]]
        raise ShardError(f"{path}: manifest lists tensor {bad[0]} with shapes that disagree with the architecture")
    try:
        with safe_open(str(path), framework="pt") as f:
            have = {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ShardError(f"{path}: not a readable safetensors file ({e})") from None
    if set(have) != set(want):
        odd = sorted(set(have) ^ set(want))[0]
        raise ShardError(f"{path}: tensor {odd} is {'missing' if odd in want else 'not expected'}")
    st_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    for n, shape in want.items():
        if have[n][0] != shape:
            raise ShardError(f"{path}: tensor {n} has shape {have[n][0]}, expected {shape}")
        if have[n][1] != st_dtype:
            raise ShardError(f"{path}: tensor {n} is {have[n][1]}, manifest says {dtype}")


def _check_tokenizer(directory: Path, m: Manifest, verify_hash: bool) -> None:
    for rec in m.tokenizer.files:
        check_file(Path(directory) / rec.file, rec, verify_hash)


def verify_dir(shards_dir) -> Manifest:
    """Check the manifest, the tokenizer files, every shard and any exported ONNX graph; the manifest."""
    d = Path(shards_dir)
    m = read_manifest(d)
    _check_tokenizer(d, m, True)
    for entry in m.shards:
        check_shard(d, entry, m.architecture, m.dtype)
    for entry in m.onnx.values():
        check_file(d / entry.file, entry)
    return m


# ---- stage ---------------------------------------------------------------------------------------
class TierStage(Stage):
    """One tier's shards as a runnable `trunk.stage.Stage`: embedding (first tier), trunk layers
    [start, stop), its exit heads, each exit's unembedding; plus where they came from."""

    def __init__(self, tier: str, manifest: Manifest, model: FamilyModel,
                 unembed: dict[int, torch.Tensor], tokenizer, shards: list[ShardEntry]):
        super().__init__(model, [g for s in shards for g in s.exits], unembed=unembed,
                         has_embedding=shards[0].has_embedding)
        self.tier, self.manifest, self.tokenizer = tier, manifest, tokenizer
        self.shards = [s.index for s in shards]
        self.val_loss = manifest.val_loss(self.exits)

    def __repr__(self) -> str:
        return (f"TierStage({self.tier!r}, layers [{self.start_layer}, {self.stop_layer}), exits {self.exits}, "
                f"{self.nbytes() / 2**20:.2f} MiB {_NAMES[self.dtype]} on {self.device})")

    def nbytes(self) -> int:
        """Bytes of weights held (each tensor once)."""
        seen = {t.data_ptr(): t.numel() * t.element_size()
                for t in [*self.model.state_dict().values(), *self.unembed.values()]}
        return sum(seen.values())


def _build_model(cfg: FamilyConfig, shards: list[ShardEntry], tensors: dict[str, torch.Tensor],
                 device, dtype) -> FamilyModel:
    """A FamilyModel whose held modules hold `tensors` and whose other modules are gone."""
    model = _meta_model(cfg)
    held = set(range(shards[0].layers[0], shards[-1].layers[1]))
    for i in range(cfg.n_layers):
        if i not in held:
            model.layers[i] = nn.Identity()
    head_gs = {g for s in shards for g in s.exits}
    for g in range(cfg.G - 1):
        if g not in head_gs:
            model.heads[g] = nn.Identity()
    if not shards[0].has_embedding:
        model.embed = None
    if not shards[-1].is_last:
        model.norm = None
    model.lm_head = None  # every exit's unembedding lives in TierStage.unembed_VD
    own = {n: t for n, t in tensors.items() if n in model.state_dict()}
    model.load_state_dict(own, strict=True, assign=True)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not stray, f"unmaterialised tensors after load: {stray[:3]}"
    return model.eval()


def load_tier(shards_dir, tier: str, *, device="cpu", dtype: torch.dtype | None = None,
              verify: bool = True) -> TierStage:
    """Load one tier's shards. Checks the manifest and each shard's names and shapes always, and
    sha256 of shards and tokenizer files when `verify`; any mismatch is a `ShardError` naming the file."""
    from safetensors.torch import load_file

    d = Path(shards_dir)
    m = read_manifest(d)
    cfg, entries = m.architecture, m.tier_shards(tier)
    _check_tokenizer(d, m, verify)
    dtype = dtype or DTYPES[m.dtype]
    tensors: dict[str, torch.Tensor] = {}
    for e in entries:
        check_shard(d, e, cfg, m.dtype, verify)
        loaded = load_file(str(d / e.file), device=str(device))
        tensors.update({n: t.to(dtype) for n, t in loaded.items()})
    try:
        tokenizer = load_tokenizer(d)
    except TokenizerError as e:
        raise ShardError(str(e)) from None
    model = _build_model(cfg, entries, tensors, device, dtype)
    unembed = {g: tensors[n] for e in entries for g, n in e.unembed.items()}
    return TierStage(tier, m, model, unembed, tokenizer, entries)


def load_chain(shards_dir, **kw) -> list[TierStage]:
    """Every tier's stage, shallow to deep (tests and single-process runs)."""
    return [load_tier(shards_dir, t.name, **kw) for t in read_manifest(shards_dir).tiers]
