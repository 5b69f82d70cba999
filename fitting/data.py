"""Runs in, fitting arrays out: the JSONL run-record and CSV readers and the per-law feature tables.

Formats (the format is read from the content, never from the file name):
- JSONL run records (docs/run-record.md), exactly as `familial-train` writes them: one object per line
  with at least N, D, G, loss; also used when present: N_total, flops_total (the run's compute budget),
  exit_val_loss, exit_layers, n_layers, exit_dense_loss (per-exit loss of a size-matched dense model, for
  the branch law). A record whose `schema` is not familial.run/v1 is refused; unknown keys are ignored.
- CSV with a header: N,D,G,loss (G optional; C optional = compute budget; N_total optional) for
  family/dense; P,Q,D,loss,L_dense (C or N optional) for the branch law.
N: `n_kind` = "non-embedding" reads N, "total" reads N_total (embeddings and untied heads included; the
paper's convention). In the branch rows the exit's N is N l_g / L, plus the embedding share for "total".
Which runs feed which law: family = every run's `loss`; dense = runs with G == 1; branch = one row per
exit (exit g of G, 0-based: P = g exits before it, Q = G - 1 - g after it) from CSV rows or records.
This file does no fitting; `fitter.py` does.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fitting.objective import LawData


class DataError(ValueError):
    """Input that cannot be fitted; the message is one line for the user."""


RUN_SCHEMA = "familial.run/v1"
N_KEYS = {"non-embedding": "N", "total": "N_total"}


@dataclass
class Runs:
    loss: np.ndarray           # (n,) target loss
    D: np.ndarray              # (n,) training tokens
    N: np.ndarray              # (n,) non-embedding params (nan for branch CSV without N)
    G: np.ndarray              # (n,) exits (1 for dense; branch rows: the family's P + Q + 1)
    C: np.ndarray              # (n,) compute budget (FLOPs): flops_total, or C column, or 6 N D
    P: np.ndarray | None = None       # branch: exits before this one (exit g of G: P = g)
    Q: np.ndarray | None = None       # branch: exits after this one (Q = G - 1 - g)
    L_dense: np.ndarray | None = None  # branch: size-matched dense loss

    @property
    def n(self) -> int:
        return len(self.loss)

    def lawdata(self) -> LawData:
        t = lambda v: torch.tensor(np.nan_to_num(v, nan=1.0), dtype=torch.float64)
        z = torch.zeros(self.n, dtype=torch.float64)
        return LawData(y=t(np.log(self.loss)), lnN=t(np.log(self.N)), lnD=t(np.log(self.D)),
                       lnG=t(np.log(self.G)),
                       P=t(self.P) if self.P is not None else z,
                       Q=t(self.Q) if self.Q is not None else z,
                       Ld=t(self.L_dense) if self.L_dense is not None else z)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL or CSV file as dicts (JSONL when the first non-blank character is '{')."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise DataError(f"{path} is empty")
    if text.lstrip()[0] == "{":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: not a JSON object")
                if row.get("schema", RUN_SCHEMA) != RUN_SCHEMA:
                    raise DataError(f"{path}:{i}: run record schema {row['schema']!r}, this reader knows {RUN_SCHEMA}")
                rows.append(row)
        return rows
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for i, r in enumerate(reader, 2):
        try:
            rows.append({k.strip(): float(v) for k, v in r.items() if k and v not in (None, "")})
        except ValueError:
            raise DataError(f"{path}:{i}: non-numeric value in a CSV row") from None
    return rows


def _num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{what} must be a number, got {v!r}")
    return float(v)


def _col(rows: list[dict], key: str, required: bool = True, default=math.nan) -> np.ndarray:
    out = []
    for i, r in enumerate(rows):
        if key not in r:
            if required:
                raise DataError(f"run {i + 1} has no {key!r} field (need {key} for this law)")
            out.append(default)
        else:
            out.append(_num(r[key], f"run {i + 1}: {key}"))
    return np.asarray(out, dtype=np.float64)


def _check(name: str, v: np.ndarray) -> None:
    if not np.all(np.isfinite(v) & (v > 0)):
        raise DataError(f"every {name} must be a positive number")


def _budget(rows: list[dict], N: np.ndarray, D: np.ndarray) -> np.ndarray:
    C = np.array([_num(r.get("flops_total", r.get("C", math.nan)), f"run {i + 1}: flops_total")
                  for i, r in enumerate(rows)])
    fallback = 6.0 * N * D if np.all(np.isfinite(N)) else D
    return np.where(np.isfinite(C), C, fallback)


def _n_key(n_kind: str) -> str:
    if n_kind not in N_KEYS:
        raise DataError(f"n_kind must be one of {', '.join(N_KEYS)}, got {n_kind!r}")
    return N_KEYS[n_kind]


def family_runs(rows: list[dict], dense_only: bool = False, n_kind: str = "non-embedding") -> Runs:
    """Runs for the family law (every run) or the dense law (G == 1 runs; G defaults to 1 in CSV)."""
    G = _col(rows, "G", required=False, default=1.0)
    if dense_only:
        keep = G == 1
        rows = [r for r, k in zip(rows, keep) if k]
        if not rows:
            raise DataError("no dense runs (G == 1) to fit the dense law to")
        G = G[keep]
    N, D, L = _col(rows, _n_key(n_kind)), _col(rows, "D"), _col(rows, "loss")
    for name, v in (("N", N), ("D", D), ("loss", L), ("G", G)):
        _check(name, v)
    return Runs(loss=L, D=D, N=N, G=G, C=_budget(rows, N, D))


def branch_runs(rows: list[dict], dense_predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                n_kind: str = "non-embedding") -> Runs:
    """One row per exit. CSV rows carry P, Q, D, loss, L_dense; run records are expanded per exit.

    Exit g (0-based) of a G-exit record gives P = g (exits before it) and Q = G - 1 - g (exits after).
    For run records without `exit_dense_loss`, L_dense comes from `dense_predict(N_g, D)` with
    N_g = N * l_g / L (the exit's share of the trunk; with n_kind "total" plus N_total - N, the embeddings),
    e.g. a dense-law fit to the file's G == 1 runs.
    """
    _n_key(n_kind)
    if rows and "P" in rows[0]:
        P, Q, D, L, Ld = (_col(rows, k) for k in ("P", "Q", "D", "loss", "L_dense"))
        N = _col(rows, "N", required=False)
        C = _budget(rows, N, D)
    else:
        recs = [r for r in rows if int(r.get("G", 1)) > 1]
        if not recs:
            raise DataError("no familial runs (G > 1) to expand into per-exit branch rows")
        P, Q, D, L, Ld, N, C = ([] for _ in range(7))
        for i, r in enumerate(recs):
            try:
                exits = list(r["exit_layers"]) + [r["n_layers"]]
                losses = r["exit_val_loss"]
            except KeyError as e:
                raise DataError(f"run record {i + 1} lacks {e.args[0]!r}, needed for the branch law") from None
            if len(losses) != len(exits):
                raise DataError(f"run record {i + 1}: {len(losses)} exit losses for {len(exits)} exits")
            emb = r["N_total"] - r["N"] if n_kind == "total" and "N_total" in r else 0.0
            if n_kind == "total" and "N_total" not in r:
                raise DataError(f"run record {i + 1} lacks 'N_total', needed for --n total")
            for g, (l, loss) in enumerate(zip(exits, losses)):
                P.append(g), Q.append(len(exits) - 1 - g), D.append(r["D"]), L.append(loss)
                N.append(emb + r["N"] * l / r["n_layers"])
                C.append(r.get("flops_total", 6.0 * r["N"] * r["D"]))
                Ld.append(r["exit_dense_loss"][g] if "exit_dense_loss" in r else math.nan)
        P, Q, D, L, Ld, N, C = (np.asarray(v, dtype=np.float64) for v in (P, Q, D, L, Ld, N, C))
        if np.isnan(Ld).any():
            if dense_predict is None:
                raise DataError("run records have no exit_dense_loss and there is no dense fit to supply L_dense")
            Ld = np.where(np.isnan(Ld), dense_predict(N, D), Ld)
    for name, v in (("D", D), ("loss", L), ("L_dense", Ld)):
        _check(name, v)
    if not (np.all(np.isfinite(P) & (P >= 0)) and np.all(np.isfinite(Q) & (Q >= 0))):
        raise DataError("branch rows need P >= 0 and Q >= 0 (exits before and after the exit)")
    return Runs(loss=L, D=D, N=N, G=P + Q + 1, C=C, P=P, Q=Q, L_dense=Ld)
