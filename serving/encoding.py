"""How responses become bytes: `json_dumps`, the one JSON encoder of every response body and SSE line,
and `dump`, a response model as the dict that is sent.

JSON has no Infinity or NaN, so non-finite floats (a latency estimate not yet learned) go out as null;
output is ASCII-only, so no string can break the encoding. The response models themselves are
`protocol.py`'s.
"""
from __future__ import annotations

import json
import math


def finite(obj):
    """`obj` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_dumps(obj) -> str:
    """Strict JSON (allow_nan=False after `finite`), ASCII-only so no string can break the encoding."""
    return json.dumps(finite(obj), allow_nan=False)


def dump(model) -> dict:
    """A response model as a dict, dropping only empty Familial extension fields (the OpenAI fields stay,
    null included, so the `openai` client finds every attribute it expects)."""
    d = model.model_dump()
    for c in d.get("choices", []):
        if c.get("familial") is None:
            c.pop("familial", None)
        else:
            c["familial"] = {k: v for k, v in c["familial"].items() if v is not None}
    return d
