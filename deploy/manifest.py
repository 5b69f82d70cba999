"""The stage-shard manifest: its schema, tier specs, hashing, and the structural checks a node runs.

A shard directory holds `shard-{k}.safetensors` for k = 0..G-1, the tokenizer files copied from the
checkpoint, and `manifest.json` (written last, atomically, so a directory with a manifest is
complete). Schema (format "familial-shards/v1"):

    format, created
    source:       {dir, files: {"model.safetensors": {sha256, bytes}, "family.json": {sha256, bytes}}}
    architecture: FamilyConfig.to_dict()
    dtype:        dtype of every shard tensor ("float32" | "float16" | "bfloat16")
    exits:        [{index, layer, val_loss}]                     (copied from family.json)
    tokenizer:    {type, vocab_size, files: [{file, sha256, bytes}]}
    tiers:        [{name, shards: [k, ...]}]                      (consecutive, shallow to deep)
    shards:       [{index, file, tier, layers: [start, stop], exits: [g], has_embedding, is_last,
                    unembed: {g: tensor name}, dtype, bytes, sha256,
                    tensors: {name: [shape...]}}]
    onnx:         {tier: {...}}                                   (added by `export-onnx`, optional)

Every file a manifest lists must lie inside its directory (`trunk.artifacts.confined`); shard files
must carry their canonical names. This file knows the format but not what a shard holds
(`deploy/shards.py` owns the layout) and loads no tensors. Every problem is one `ShardError` line
that names the file.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from trunk.artifacts import confined, read_json_artifact, write_json_atomic
from trunk.checkpoint import DTYPES
from trunk.config import ConfigError, FamilyConfig

FORMAT = "familial-shards/v1"
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard directory, manifest or shard file that a node must refuse; the message names the file."""


class TierSpecError(ValueError):
    """A `--tiers` spec that does not split the shards into consecutive tiers."""


def shard_file(k: int) -> str:
    return f"shard-{k}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---- tiers -------------------------------------------------------------------------------------
_TIER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def default_tiers(n_shards: int) -> str:
    return {1: "cloud=0", 2: "device=0,cloud=1"}.get(n_shards, "device=0,edge=1,cloud=2..")


def parse_tier_spec(spec: str, n_shards: int) -> list[tuple[str, list[int]]]:
    """`device=0,edge=1,cloud=2..` -> [("device", [0]), ("edge", [1]), ("cloud", [2, ...])].

    A range is `k`, `a-b` or `a..b` (inclusive) or `a..` (to the last shard). Tiers must be listed
    shallow to deep and cover every shard exactly once, since each tier relays to the next.
    """
    tiers: list[tuple[str, list[int]]] = []
    for item in (s.strip() for s in spec.split(",")):
        name, eq, rng = item.partition("=")
        name, rng = name.strip(), rng.strip()
        if not eq or not _TIER_NAME.match(name):
            raise TierSpecError(f"tier spec item {item!r} must look like NAME=RANGE (e.g. edge=1, cloud=2..)")
        m = re.fullmatch(r"(\d+)(?:(?:-|\.\.)(\d*))?", rng)
        if not m or (m.group(2) == "" and "-" in rng):
            raise TierSpecError(f"tier {name!r}: bad shard range {rng!r} (use k, a-b, a..b or a..)")
        a = int(m.group(1))
        b = a if m.group(2) is None else (n_shards - 1 if m.group(2) == "" else int(m.group(2)))
        if not 0 <= a <= b < n_shards:
            raise TierSpecError(f"tier {name!r}: shard range {rng!r} outside 0..{n_shards - 1}")
        tiers.append((name, list(range(a, b + 1))))
    names = [n for n, _ in tiers]
    if len(set(names)) != len(names):
        raise TierSpecError(f"tier names repeat in {spec!r}")
    flat = [k for _, ks in tiers for k in ks]
    if flat != list(range(n_shards)):
        raise TierSpecError(f"tiers {spec!r} must cover shards 0..{n_shards - 1} once each, in order")
    return tiers


# ---- reading and checking ------------------------------------------------------------------------
def write_manifest(directory: Path, manifest: dict) -> Path:
    return write_json_atomic(Path(directory) / MANIFEST, manifest)


def read_manifest(directory) -> tuple[dict, FamilyConfig]:
    """Parse and structurally check manifest.json; (manifest, config). Hashes are checked elsewhere."""
    path = Path(directory) / MANIFEST
    m = read_json_artifact(path, FORMAT, ShardError, kind="a shard manifest",
                           missing_hint=f"is {directory} a shard directory made by `familial-deploy split`?")
    try:
        cfg = FamilyConfig.from_dict(m["architecture"])
        _check_structure(m, cfg)
        listed = [rec["file"] for rec in m["tokenizer"]["files"]] + [e["file"] for e in m.get("onnx", {}).values()]
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: {e}") from None
    for name in listed:  # before anything is opened or hashed
        confined(directory, name, ShardError, what=f"{MANIFEST} entry")
    return m, cfg


def _check_structure(m: dict, cfg: FamilyConfig) -> None:
    if m["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {m['dtype']!r}")
    shards = m["shards"]
    if len(shards) != cfg.G:
        raise ValueError(f"{len(shards)} shards listed, the architecture has G={cfg.G} exits")
    bounds = (0,) + cfg.exits
    for k, s in enumerate(shards):
        want = {"index": k, "file": shard_file(k), "layers": [bounds[k], bounds[k + 1]], "exits": [k],
                "has_embedding": k == 0, "is_last": k == cfg.G - 1}
        for key, val in want.items():
            if s[key] != val:
                raise ValueError(f"shard {k}: {key} is {s[key]!r}, expected {val!r}")
        for key in ("tier", "unembed", "dtype", "bytes", "sha256", "tensors"):
            s[key]  # KeyError names the missing field
    spec = ",".join(f"{t['name']}={t['shards'][0]}-{t['shards'][-1]}" for t in m["tiers"])
    tiers = parse_tier_spec(spec, cfg.G)
    for (name, ks), t in zip(tiers, m["tiers"]):
        if ks != t["shards"] or any(shards[k]["tier"] != name for k in ks):
            raise ValueError(f"tier {name!r}: shards {t['shards']} disagree with the shard entries")


def tier_entry(m: dict, tier: str) -> dict:
    for t in m["tiers"]:
        if t["name"] == tier:
            return t
    raise ShardError(f"{MANIFEST}: no tier {tier!r}; tiers are {', '.join(t['name'] for t in m['tiers'])}")


def check_file(path: Path, record: dict, verify_hash: bool = True) -> None:
    """The file exists with the recorded size and (optionally) sha256."""
    if not path.is_file():
        raise ShardError(f"{path}: not found")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ShardError(f"{path}: {size} bytes, manifest says {record['bytes']}")
    if verify_hash:
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise ShardError(f"{path}: sha256 {digest[:16]}... does not match the manifest ({record['sha256'][:16]}...)")
