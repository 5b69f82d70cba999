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

In memory the manifest is a `Manifest` dataclass (one dataclass per object above; `from_dict` and
`to_dict` are the only code that knows the JSON spelling). Tier names are data: any names, any number.
Every file a manifest lists must lie inside its directory (`trunk.artifacts.confined`); shard files
must carry their canonical names. This file knows the format but not what a shard holds
(`deploy/shards.py` owns the layout) and loads no tensors. Every problem is one `ShardError` line
that names the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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


# ---- the document --------------------------------------------------------------------------------
# One dataclass per JSON object of the schema above; `from_dict` / `to_dict` are the only places that
# know the JSON spelling (string keys of `unembed`, lists for tuples), so `to_dict(from_dict(d)) == d`.

@dataclass(frozen=True)
class FileRecord:
    """A file the manifest vouches for: its name inside the directory, sha256 and size."""
    file: str
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d: dict, file: str | None = None) -> "FileRecord":
        return cls(d["file"] if file is None else file, d["sha256"], d["bytes"])

    def to_dict(self, named: bool = True) -> dict:
        return ({"file": self.file} if named else {}) | {"sha256": self.sha256, "bytes": self.bytes}


def file_record(path: Path) -> FileRecord:
    path = Path(path)
    return FileRecord(path.name, sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class Source:
    """The checkpoint a shard directory was split from: its directory and {file name: record}."""
    dir: str
    files: dict[str, FileRecord]

    @classmethod
    def from_dict(cls, d: dict) -> "Source":
        return cls(d["dir"], {n: FileRecord.from_dict(r, file=n) for n, r in d["files"].items()})

    def to_dict(self) -> dict:
        return {"dir": self.dir, "files": {n: r.to_dict(named=False) for n, r in self.files.items()}}


@dataclass(frozen=True)
class ExitEntry:
    """Exit g: the layer it reads (the trunk's exit_layers, then n_layers) and its validation loss."""
    index: int
    layer: int
    val_loss: Optional[float]

    @classmethod
    def from_dict(cls, d: dict) -> "ExitEntry":
        return cls(d["index"], d["layer"], d.get("val_loss"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenizerInfo:
    type: str
    vocab_size: int
    files: list[FileRecord]     # copied from the checkpoint into the shard directory

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerInfo":
        return cls(d["type"], d["vocab_size"], [FileRecord.from_dict(r) for r in d["files"]])

    def to_dict(self) -> dict:
        return {"type": self.type, "vocab_size": self.vocab_size, "files": [r.to_dict() for r in self.files]}


@dataclass(frozen=True)
class TierEntry:
    """A tier: its name (any `_TIER_NAME`; data, not a fixed set) and its consecutive shards."""
    name: str
    shards: list[int]

    @classmethod
    def from_dict(cls, d: dict) -> "TierEntry":
        return cls(d["name"], list(d["shards"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "shards": list(self.shards)}


@dataclass(frozen=True)
class ShardEntry:
    """Shard k: trunk layers [start, stop), exit k's head, where each exit's unembedding lives in the
    file, and the file's size, hash and tensor shapes."""
    index: int
    file: str
    tier: str
    layers: tuple[int, int]            # [start, stop)
    exits: list[int]
    has_embedding: bool
    is_last: bool
    unembed: dict[int, str]            # exit g -> tensor name in this shard
    dtype: str
    bytes: int
    sha256: str
    tensors: dict[str, tuple[int, ...]]

    @classmethod
    def from_dict(cls, d: dict) -> "ShardEntry":
        start, stop = d["layers"]
        return cls(d["index"], d["file"], d["tier"], (start, stop), list(d["exits"]), d["has_embedding"],
                   d["is_last"], {int(g): n for g, n in d["unembed"].items()}, d["dtype"], d["bytes"],
                   d["sha256"], {n: tuple(s) for n, s in d["tensors"].items()})

    def to_dict(self) -> dict:
        return {"index": self.index, "file": self.file, "tier": self.tier, "layers": list(self.layers),
                "exits": list(self.exits), "has_embedding": self.has_embedding, "is_last": self.is_last,
                "unembed": {str(g): n for g, n in self.unembed.items()}, "dtype": self.dtype,
                "bytes": self.bytes, "sha256": self.sha256,
                "tensors": {n: list(s) for n, s in self.tensors.items()}}


@dataclass(frozen=True)
class OnnxEntry:
    """A tier exported to ONNX (`deploy/onnx_export.py`): the graph file and how to feed it."""
    file: str
    sha256: str
    bytes: int
    opset: int
    dtype: str
    inputs: list[str]
    outputs: list[str]
    cache_layers: list[str]          # the layers whose past/present key-value tensors the graph carries
    exported: str                    # UTC time of the export
    torch: str                       # torch version that exported it
    check: Optional[dict] = None     # summary of the last ONNX-vs-PyTorch check (`check_tier`)

    @classmethod
    def from_dict(cls, d: dict) -> "OnnxEntry":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d or f.default is dataclasses.MISSING})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["check"] is None:
            del d["check"]
        return d


@dataclass
class Manifest:
    """manifest.json (format "familial-shards/v1") as read and written; see the module docstring."""
    created: str
    source: Source
    architecture: FamilyConfig
    dtype: str                          # of every shard tensor
    exits: list[ExitEntry]
    tokenizer: TokenizerInfo
    tiers: list[TierEntry]              # shallow to deep
    shards: list[ShardEntry]            # shard k at index k
    onnx: dict[str, OnnxEntry] = field(default_factory=dict)   # tier -> export, added by `export-onnx`
    format: str = FORMAT

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(created=d["created"], source=Source.from_dict(d["source"]),
                   architecture=FamilyConfig.from_dict(d["architecture"]), dtype=d["dtype"],
                   exits=[ExitEntry.from_dict(e) for e in d["exits"]],
                   tokenizer=TokenizerInfo.from_dict(d["tokenizer"]),
                   tiers=[TierEntry.from_dict(t) for t in d["tiers"]],
                   shards=[ShardEntry.from_dict(s) for s in d["shards"]],
                   onnx={t: OnnxEntry.from_dict(e) for t, e in d.get("onnx", {}).items()}, format=d["format"])

    def to_dict(self) -> dict:
        d = {"format": self.format, "created": self.created, "source": self.source.to_dict(),
             "architecture": self.architecture.to_dict(), "dtype": self.dtype,
             "exits": [e.to_dict() for e in self.exits], "tokenizer": self.tokenizer.to_dict(),
             "tiers": [t.to_dict() for t in self.tiers], "shards": [s.to_dict() for s in self.shards]}
        if self.onnx:
            d["onnx"] = {t: e.to_dict() for t, e in self.onnx.items()}
        return d

    def tier(self, name: str) -> TierEntry:
        for t in self.tiers:
            if t.name == name:
                return t
        raise ShardError(f"{MANIFEST}: no tier {name!r}; tiers are {', '.join(t.name for t in self.tiers)}")

    def tier_shards(self, name: str) -> list[ShardEntry]:
        """The shard entries of tier `name`, shallow to deep."""
        return [self.shards[k] for k in self.tier(name).shards]

    def val_loss(self, exits) -> dict[int, Optional[float]]:
        """{g: validation loss} of the exits `exits` (as family.json recorded them)."""
        return {e.index: e.val_loss for e in self.exits if e.index in exits}


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
def write_manifest(directory: Path, manifest: Manifest) -> Path:
    return write_json_atomic(Path(directory) / MANIFEST, manifest.to_dict())


def read_manifest(directory) -> Manifest:
    """Parse and structurally check manifest.json. Hashes are checked elsewhere."""
    path = Path(directory) / MANIFEST
    doc = read_json_artifact(path, FORMAT, ShardError, kind="a shard manifest",
                             missing_hint=f"is {directory} a shard directory made by `familial-deploy split`?")
    try:
        listed = [rec["file"] for rec in doc["tokenizer"]["files"]] + [e["file"] for e in doc.get("onnx", {}).values()]
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{path}: {e!r}") from None
    for name in listed:  # before anything is parsed further, opened or hashed
        confined(directory, name, ShardError, what=f"{MANIFEST} entry")
    try:
        m = Manifest.from_dict(doc)
        _check_structure(m)
    except (ConfigError, KeyError, IndexError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: {e}") from None
    return m


def _check_structure(m: Manifest) -> None:
    cfg = m.architecture
    if m.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {m.dtype!r}")
    if len(m.shards) != cfg.G:
        raise ValueError(f"{len(m.shards)} shards listed, the architecture has G={cfg.G} exits")
    bounds = (0,) + cfg.exits
    for k, s in enumerate(m.shards):
        want = {"index": k, "file": shard_file(k), "layers": (bounds[k], bounds[k + 1]), "exits": [k],
                "has_embedding": k == 0, "is_last": k == cfg.G - 1}
        for key, val in want.items():
            have = getattr(s, key)
            if have != val:
                as_json = lambda v: list(v) if isinstance(v, tuple) else v
                raise ValueError(f"shard {k}: {key} is {as_json(have)!r}, expected {as_json(val)!r}")
    spec = ",".join(f"{t.name}={t.shards[0]}-{t.shards[-1]}" for t in m.tiers)
    tiers = parse_tier_spec(spec, cfg.G)
    for (name, ks), t in zip(tiers, m.tiers):
        if ks != t.shards or any(m.shards[k].tier != name for k in ks):
            raise ValueError(f"tier {name!r}: shards {t.shards} disagree with the shard entries")


def check_file(path: Path, record: FileRecord | ShardEntry | OnnxEntry, verify_hash: bool = True) -> None:
    """The file exists with the recorded size and (optionally) sha256."""
    if not path.is_file():
        raise ShardError(f"{path}: not found")
    size = path.stat().st_size
    if size != record.bytes:
        raise ShardError(f"{path}: {size} bytes, manifest says {record.bytes}")
    if verify_hash:
        digest = sha256_file(path)
        if digest != record.sha256:
            raise ShardError(f"{path}: sha256 {digest[:16]}... does not match the manifest ({record.sha256[:16]}...)")
