"""Named corpus presets for `familial-train prepare --preset NAME`: which documents, from where.

`pycorpus` is the Python source and documentation installed on this machine: the standard library and
every site-packages directory Python knows of (`sysconfig`, `site`), files ending in .py, .pyi, .rst,
.md or .txt, each at most `max_file_bytes` (larger ones are mostly generated tables), outside
`*.dist-info` / `*.egg-info` / `__pycache__` folders, deduplicated by the SHA-256 of their bytes (the
first path in sorted order wins). It needs nothing from the network, so a GPU machine with no outside
access can build the same corpus from its own installation; two machines with the same image get the
same documents. The result lists what was read so the index can say what the corpus is.

This file only finds and reads documents; tokenizing and writing shards is `trunk/data.py`'s job.
"""
from __future__ import annotations

import hashlib
import os
import site
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

PRESETS = ("pycorpus",)
PY_EXTS = (".py", ".pyi", ".rst", ".md", ".txt")
_SKIP_DIRS = ("__pycache__",)
_SKIP_SUFFIXES = (".dist-info", ".egg-info")


@dataclass
class Corpus:
    documents: list[str]            # decoded text, one per unique file, in sorted path order
    roots: list[str]                # folders searched
    files_seen: int = 0             # candidate files (right extension, small enough)
    duplicates: int = 0             # files dropped because an earlier file had the same bytes
    skipped_large: int = 0          # files over max_file_bytes
    bytes: int = 0                  # bytes of the unique documents kept
    truncated: bool = False         # stopped at max_bytes before reading every file
    by_root: dict = field(default_factory=dict)  # root -> unique documents kept from it

    def summary(self) -> dict:
        return {"preset": "pycorpus", "roots": self.roots, "files_seen": self.files_seen,
                "unique_documents": len(self.documents), "duplicates_dropped": self.duplicates,
                "skipped_large": self.skipped_large, "bytes": self.bytes, "truncated": self.truncated,
                "documents_by_root": self.by_root}


def python_roots() -> list[Path]:
    """Standard library and site-packages folders, outermost first, without nesting duplicates."""
    paths = sysconfig.get_paths()
    cands = [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    cands += list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    cands.append(user)
    roots: list[Path] = []
    for c in cands:
        if not c:
            continue
        p = Path(c).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return roots


def _candidates(roots: list[Path], exts: tuple[str, ...]):
    """(root, path) of every file with a wanted extension, each real path once, in sorted order.

    A root nested inside another (a venv's site-packages under its stdlib) is walked as itself only,
    so every document is counted under the innermost root that holds it."""
    seen: set[Path] = set()
    for root in roots:
        nested = {r for r in roots if r != root and root in r.parents}
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(_SKIP_SUFFIXES)
                                 and here / d not in nested)
            for name in sorted(filenames):
                p = here / name
                if p.suffix not in exts or not p.is_file():
                    continue
                real = p.resolve()
                if real not in seen:
                    seen.add(real)
                    yield root, p


def python_corpus(roots: list[Path] | None = None, *, exts: tuple[str, ...] = PY_EXTS,
                  max_file_bytes: int = 1 << 20, max_bytes: int = 0, progress: bool = True) -> Corpus:
    """Read the installed Python source and docs, deduplicated by content hash.

    max_bytes > 0 stops once that many unique bytes are kept (tests, quick looks); 0 reads everything.
    """
    from tqdm import tqdm

    roots = [Path(r) for r in roots] if roots is not None else python_roots()
    c = Corpus(documents=[], roots=[str(r) for r in roots])
    hashes: set[bytes] = set()
    bar = tqdm(desc="read pycorpus", unit="B", unit_scale=True, disable=not progress)
    for root, path in _candidates(roots, exts):
        try:
            size = path.stat().st_size
            if size > max_file_bytes:
                c.skipped_large += 1
                continue
            raw = path.read_bytes()
        except OSError:
            continue  # unreadable entries (broken links, permissions) are not part of the corpus
        c.files_seen += 1
        h = hashlib.sha256(raw).digest()
        if h in hashes:
            c.duplicates += 1
            continue
        hashes.add(h)
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        c.documents.append(text)
        c.bytes += len(raw)
        c.by_root[str(root)] = c.by_root.get(str(root), 0) + 1
        bar.update(len(raw))
        if max_bytes and c.bytes >= max_bytes:
            c.truncated = True
            break
    bar.close()
    return c
