"""Self-describing JSON artefacts (family.json, the data index, the shard manifest): written
atomically (temporary file + rename) and read back with a format check that fails in one line; and
`confined`, which keeps a file name listed in an artefact inside the artefact's own folder.
The documents' contents belong to their owners (`checkpoint.py`, `data.py`, `deploy/manifest.py`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_json_artifact(path: str | os.PathLike, fmt: str, error: type[Exception], *, kind: str,
                       missing_hint: str) -> dict:
    """The JSON object at `path` whose "format" is `fmt`; otherwise `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found ({missing_hint})")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise error(f"{path}: not {kind} (format {got!r}, expected {fmt!r})")
    return doc


def confined(directory: str | os.PathLike, name, error: type[Exception], *, what: str = "file") -> Path:
    """`directory / name` for a file name listed in an artefact, or `error` if it could leave `directory`.

    The name must be a non-empty relative path without `..` (in POSIX or Windows spelling), and the
    path must still lie inside `directory` once symlinks are resolved; so a crafted family.json or
    manifest can make no tool read, hash or write a file elsewhere.
    """
    d = Path(directory)
    bad = not isinstance(name, str) or not name or "\0" in name
    if not bad:
        parts = PurePosixPath(name).parts + PureWindowsPath(name).parts
        bad = (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
               or bool(PureWindowsPath(name).drive) or ".." in parts)
    if not bad:
        root = d.resolve()
        bad = not (d / name).resolve().is_relative_to(root)
    if bad:
        raise error(f"{d}: {what} {name!r} is not a file inside this directory (listed files must be relative "
                    f"paths that stay inside it)")
    return d / name
