"""Token data: raw text -> memory-mapped token shards, and the sampler the trainer reads them with.

`prepare` reads text files, folders (recursively, by extension) or JSONL files (one object per line
with a "text" field), holds out a validation split by document, tokenizes with the built-in byte-level
tokenizer, a byte-level BPE trained here with `tokenizers`, or the tokenizer of an existing family or
model directory (an imported Hugging Face model's own), and writes

    <out>/train_000.bin ...   flat uint16 (vocab <= 65536) or uint32 token ids, documents joined by eos
    <out>/val_000.bin ...
    <out>/index.json          format "familial.data/v1": dtype, vocab, tokenizer, shards and counts
    <out>/tokenizer_config.json (+ tokenizer.json for BPE)

`prepare_documents` does the same for documents already in memory (a corpus preset, `trunk/corpus.py`), and
`--tokenizer-from` reuses a saved vocabulary instead of training one.
`TokenData` opens such a directory with numpy memmaps. Batches are a pure function of a sample cursor:
the train stream is cut into non-overlapping windows of seq_len+1 tokens, each epoch visits them in a
seeded permutation, and sample i of the run is window perm_{i // W}[i % W]. The trainer's whole data
position is therefore one integer, which makes resume exact and lets DDP ranks take disjoint slices.
This file does not know about models, devices or the training loop.
"""
from __future__ import annotations

import fnmatch
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from trunk.artifacts import read_json_artifact, write_json_atomic
from trunk.tokenizer import BPETokenizer, ByteTokenizer, TokenizerError, load_tokenizer

FORMAT = "familial.data/v1"
INDEX = "index.json"
DEFAULT_EXTS = (".py", ".txt", ".md")


class DataError(ValueError):
    """Input or data directory problem; the message is one line naming the path."""


# ---- reading inputs ----------------------------------------------------------------------------

def _files(inputs: list[str], exts: tuple[str, ...], exclude: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in exts
                           and not any(fnmatch.fnmatch(str(f.relative_to(p)), pat) for pat in exclude))
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{raw}: no such file or directory")
    return out


def _read_docs(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    text = raw.decode("utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{n}: JSONL lines need a string \"text\" field")
        docs.append(obj["text"])
    return docs


def read_documents(inputs: list[str], exts=DEFAULT_EXTS, exclude=(), progress: bool = True) -> list[str]:
    """Every non-empty document under `inputs`, in a stable order."""
    from tqdm import tqdm

    files = _files(list(inputs), tuple(exts), tuple(exclude))
    if not files:
        raise DataError(f"no input files found in {', '.join(map(str, inputs))} (extensions {', '.join(exts)})")
    docs = []
    for f in tqdm(files, desc="read", unit="file", disable=not progress):
        docs.extend(d for d in _read_docs(f) if d.strip())
    if not docs:
        raise DataError(f"input is empty: {len(files)} file(s) under {', '.join(map(str, inputs))} hold no text")
    return docs


# ---- prepare -----------------------------------------------------------------------------------

def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a seeded random ~val_fraction of documents (at least one; a lone document is cut at
    its last val_fraction of characters)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val fraction must lie in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val_ids = set(order[:n_val])
    return ([d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids])


def _encode_all(tok, docs: list[str], desc: str, progress: bool) -> Iterator[np.ndarray]:
    from tqdm import tqdm

    chunk = 256
    bar = tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress)
    for i in range(0, len(docs), chunk):
        part = docs[i:i + chunk]
        for seq in tok.encode_batch(part):
            yield np.asarray(seq + [tok.eos_id], dtype=np.int64)
        bar.update(len(part))
    bar.close()


def _write_split(out: Path, name: str, arrays: Iterator[np.ndarray], dtype, shard_tokens: int) -> list[dict]:
    shards, buf, n_buf = [], [], 0

    def flush():
        nonlocal buf, n_buf
        fname = f"{name}_{len(shards):03d}.bin"
        tmp = out / (fname + ".tmp")
        np.concatenate(buf).astype(dtype).tofile(tmp)
        os.replace(tmp, out / fname)
        shards.append({"file": fname, "tokens": int(n_buf)})
        buf, n_buf = [], 0

    for a in arrays:
        buf.append(a)
        n_buf += len(a)
        if n_buf >= shard_tokens:
            flush()
    if n_buf:
        flush()
    return shards


def prepare(inputs: list[str], out: str | os.PathLike, *, tokenizer: str = "byte", vocab_size: int = 2048,
            val_fraction: float = 0.05, exts=DEFAULT_EXTS, exclude=(), seed: int = 0,
            shard_tokens: int = 1 << 27, progress: bool = True, tokenizer_from: str = "") -> dict:
    """Tokenize `inputs` into shards under `out`; returns the index dict (also written as index.json)."""
    t0 = time.time()
    docs = read_documents(inputs, exts, exclude, progress)
    return prepare_documents(docs, out, sources=[str(p) for p in inputs], tokenizer=tokenizer,
                             vocab_size=vocab_size, val_fraction=val_fraction, seed=seed,
                             shard_tokens=shard_tokens, progress=progress, tokenizer_from=tokenizer_from, t0=t0)


def _make_tokenizer(kind: str, vocab_size: int, train_docs: list[str], tokenizer_from: str):
    if tokenizer_from:  # reuse a trained vocabulary, e.g. one carried over from an earlier machine
        try:
            return load_tokenizer(tokenizer_from)
        except TokenizerError as e:
            raise DataError(str(e)) from None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if vocab_size < 256 + 3:
            raise DataError(f"BPE vocab size must be at least 259 (bytes + specials), got {vocab_size}")
        return BPETokenizer.train(train_docs, vocab_size)  # trained on the train split only
    if Path(kind).is_dir():  # a model's own tokenizer (e.g. an imported Hugging Face family)
        try:
            return load_tokenizer(kind)
        except TokenizerError as e:
            raise DataError(str(e)) from None
    raise DataError(f"unknown tokenizer {kind!r}; use 'byte', 'bpe' or a directory holding tokenizer files")


def prepare_documents(docs: list[str], out: str | os.PathLike, *, sources: list[str], tokenizer: str = "byte",
                      vocab_size: int = 2048, val_fraction: float = 0.05, seed: int = 0,
                      shard_tokens: int = 1 << 27, progress: bool = True, tokenizer_from: str = "",
                      extra: dict | None = None, t0: float | None = None) -> dict:
    """Split, tokenize and write `docs`; `extra` keys (e.g. a corpus preset's summary) join the index."""
    t0 = time.time() if t0 is None else t0
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    tok = _make_tokenizer(tokenizer, vocab_size, train_docs, tokenizer_from)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    splits = {name: _write_split(d, name, _encode_all(tok, part, f"tokenize {name}", progress), dtype, shard_tokens)
              for name, part in (("train", train_docs), ("val", val_docs))}
    tok.save(d)
    index = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "tokenizer": {"type": tok.kind, "files": tok.files(), "eos_id": tok.eos_id},
        "splits": {k: {"shards": v, "tokens": sum(s["tokens"] for s in v),
                       "documents": len(train_docs if k == "train" else val_docs)} for k, v in splits.items()},
        "sources": sources,
        "val_fraction": val_fraction,
        "seed": seed,
        **(extra or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(d / INDEX, index)
    return index


# ---- reading shards ----------------------------------------------------------------------------

def read_index(directory) -> dict:
    return read_json_artifact(Path(directory) / INDEX, FORMAT, DataError, kind="a familial data index",
                              missing_hint="run `familial-train prepare` to make a data directory")


@dataclass
class _Split:
    shards: list[np.ndarray]  # memmaps, one per shard
    windows: np.ndarray       # (W, 2) int64: (shard, start) of each seq_len+1 window


class TokenData:
    """Memory-mapped train/val token streams cut into fixed windows of seq_len+1 tokens."""

    def __init__(self, directory, seq_len: int):
        self.dir = Path(directory)
        self.index = read_index(self.dir)
        self.seq_len = seq_len
        self.vocab_size = int(self.index["vocab_size"])
        self.splits = {name: self._open(name) for name in ("train", "val")}

    def _open(self, name: str) -> _Split:
        maps, wins = [], []
        for k, shard in enumerate(self.index["splits"][name]["shards"]):
            path = self.dir / shard["file"]
            try:
                mm = np.memmap(path, dtype=self.index["dtype"], mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot map token shard ({e})") from None
            if len(mm) != shard["tokens"]:
                raise DataError(f"{path}: holds {len(mm)} tokens, index says {shard['tokens']} (truncated?)")
            maps.append(mm)
            n = (len(mm) - 1) // self.seq_len  # windows overlap by one token: targets are inputs shifted
            wins.append(np.stack([np.full(n, k), np.arange(n) * self.seq_len], axis=1))
        windows = np.concatenate(wins) if wins else np.zeros((0, 2), np.int64)
        if len(windows) == 0:
            raise DataError(f"{self.dir}: the {name} split has fewer than seq_len+1 = {self.seq_len + 1} tokens")
        return _Split(maps, windows.astype(np.int64))

    def num_windows(self, split: str) -> int:
        return len(self.splits[split].windows)

    def tokenizer(self):
        try:
            return load_tokenizer(self.dir)
        except TokenizerError as e:
            raise DataError(str(e)) from None

    def _gather(self, split: str, window_ids: np.ndarray) -> np.ndarray:
        s = self.splits[split]
        rows = [np.asarray(s.shards[k][start:start + self.seq_len + 1], dtype=np.int64)
                for k, start in s.windows[window_ids]]
        return np.stack(rows)  # (B, T+1)

    def train_batch(self, cursor: int, n: int, seed: int) -> np.ndarray:
        """Samples cursor .. cursor+n-1 of the seeded epoch-permuted train stream, shape (n, T+1)."""
        W = self.num_windows("train")
        ids = np.empty(n, dtype=np.int64)
        for j in range(n):
            i = cursor + j
            ids[j] = self._perm(i // W, seed)[i % W]
        return self._gather("train", ids)

    def _perm(self, epoch: int, seed: int) -> np.ndarray:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != (epoch, seed):
            perm = np.random.default_rng([seed, epoch]).permutation(self.num_windows("train"))
            self._perm_cache = cache = ((epoch, seed), perm)
        return cache[1]

    def val_batch(self, b: int, batch_size: int, n_batches: int) -> np.ndarray:
        """Validation batch b of n_batches: windows spread evenly over the val stream (fixed set)."""
        W = self.num_windows("val")
        total = batch_size * n_batches
        ids = (np.arange(b * batch_size, (b + 1) * batch_size) * W) // max(total, 1)
        return self._gather("val", np.minimum(ids, W - 1))
