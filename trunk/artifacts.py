"""Self-describing JSON artefacts (family.json, the data index, the shard manifest): written
atomically (temporary file + rename) and read back with a format check that fails in one line.
The documents' contents belong to their owners (`checkpoint.py`, `data.py`, `deploy/manifest.py`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


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
