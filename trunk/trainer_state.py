"""`trainer_state.pt`, the trainer's resume state: written atomically, read without running code.

The state (weights, optimizer, step, data cursor, RNG states, configs) holds only tensors and plain
Python data, so it is read with `torch.load(weights_only=True)`: a crafted file that names any other
global (`os.system`, a class with `__reduce__`) is refused with one line before anything in it runs.
NumPy's RNG state is stored as a tensor plus plain numbers; files written before that (which pickled a
NumPy array) are still read, with NumPy's array reconstructor as the only extra global allowed.
What the state holds and when it is saved is the trainer's business (`trunk/train.py`).
"""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

REQUIRED = ("step", "data", "rng", "model_config")  # plus model+optimizer, or "sharded" (an fsdp run)


def _numpy_globals() -> list:
    """What pickling a NumPy RNG key array names (older trainer_state.pt files), under NumPy 2's module
    name and, for files written with NumPy 1, the old one."""
    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


# ---- RNG states as plain data ----------------------------------------------------------------------

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(n)
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- the file ---------------------------------------------------------------------------------------

def write_trainer_state(path: str | os.PathLike, state: dict) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_trainer_state(path: str | os.PathLike, error: type[Exception]) -> dict:
    """The state dict at `path`, loaded as tensors and plain data only; else `error` in one line."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        if named:
            raise error(f"{path}: refused: it names {named.group(1)}, which is not a tensor or plain data "
                        f"(trainer state is read with weights_only=True so that a crafted file cannot run code)") from None
        raise error(f"{path}: not a readable trainer state ({_reason(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise error(f"{path}: not a readable trainer state ({_reason(e)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED) or \
            ("sharded" not in state and not {"model", "optimizer"} <= set(state)):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise error(f"{path}: not a trainer state (expected keys {', '.join(REQUIRED)} and model+optimizer or "
                    f"sharded; found {have})")
    return state


def _reason(e: Exception) -> str:
    """The informative part of torch.load's long, multi-line error."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
