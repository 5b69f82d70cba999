"""Wire codec for hidden states: torch tensor (B, T, D) <-> `relay.v1.Tensor` (raw little-endian bytes).

Formats: float32 / float16 / bfloat16 as-is, and int8 with one float32 scale per (batch, position)
(symmetric: q = round(x / s), s = max|x| / 127 over the row). `decode` validates everything a peer
can get wrong (dtype, rank, byte count, scale count, non-finite values) and raises `CodecError` with a
message; it never trusts the declared shape beyond what the bytes support. The codec knows nothing of
sessions, positions or gRPC status codes (`relay/node.py` maps `CodecError` to INVALID_ARGUMENT).

Legend: B batch, T positions, D d_model.
"""
from __future__ import annotations

import numpy as np
import torch

from relay.pb import pb


class CodecError(ValueError):
    pass


# wire dtype name -> (proto enum, torch dtype, bytes per element)
WIRE_DTYPES = {
    "float32": (pb.FLOAT32, torch.float32, 4),
    "float16": (pb.FLOAT16, torch.float16, 2),
    "bfloat16": (pb.BFLOAT16, torch.bfloat16, 2),
    "int8": (pb.INT8, torch.int8, 1),
}
_BY_ENUM = {v[0]: (k, v[1], v[2]) for k, v in WIRE_DTYPES.items()}
_NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "int8": "i1"}


def wire_dtype_name(dtype: torch.dtype) -> str:
    for name, (_, td, _) in WIRE_DTYPES.items():
        if td == dtype:
            return name
    raise CodecError(f"no wire format for {dtype}")


def bytes_per_position(d_model: int, wire: str) -> int:
    return d_model * WIRE_DTYPES[wire][2] + (4 if wire == "int8" else 0)


def encode(h_BTD: torch.Tensor, wire: str = "float32") -> "pb.Tensor":
    if wire not in WIRE_DTYPES:
        raise CodecError(f"unknown wire dtype {wire!r}; known: {', '.join(WIRE_DTYPES)}")
    if h_BTD.dim() != 3:
        raise CodecError(f"hidden states must be (B, T, D), got shape {tuple(h_BTD.shape)}")
    enum, td, _ = WIRE_DTYPES[wire]
    h = h_BTD.detach().to("cpu")
    scales = b""
    if wire == "int8":
        h32 = h.float()
        s_BT1 = h32.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (B, T, 1)
        q = torch.round(h32 / s_BT1).clamp_(-127, 127).to(torch.int8)
        scales = s_BT1.reshape(-1).numpy().astype("<f4").tobytes()
        data = q.contiguous().numpy().tobytes()
    elif wire == "bfloat16":
        data = h.to(td).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        data = h.to(td).contiguous().numpy().astype(_NUMPY[wire]).tobytes()
    return pb.Tensor(dtype=enum, shape=list(h.shape), data=data, scales=scales)


def decode(t: "pb.Tensor", *, d_model: int | None = None, out_dtype: torch.dtype = torch.float32,
           max_positions: int | None = None) -> torch.Tensor:
    """Validated (B, T, D) tensor in `out_dtype`. Raises CodecError naming the problem."""
    if t.dtype not in _BY_ENUM:
        raise CodecError(f"unknown or unset hidden-state dtype {t.dtype}")
    name, td, size = _BY_ENUM[t.dtype]
    shape = tuple(int(s) for s in t.shape)
    if len(shape) != 3:
        raise CodecError(f"hidden states must have shape (B, T, D), got {list(shape)}")
    B, T, D = shape
    if B != 1:
        raise CodecError(f"batch must be 1 (one sequence per session), got {B}")
    if T < 1 or D < 1:
        raise CodecError(f"empty hidden states, shape {list(shape)}")
    if d_model is not None and D != d_model:
        raise CodecError(f"hidden size {D} does not match this tier's d_model {d_model}")
    if max_positions is not None and T > max_positions:
        raise CodecError(f"{T} positions exceed the limit of {max_positions}")
    if len(t.data) != B * T * D * size:
        raise CodecError(f"{len(t.data)} data bytes for shape {list(shape)} {name}, expected {B * T * D * size}")
    arr = np.frombuffer(t.data, dtype=_NUMPY[name]).reshape(B, T, D)
    if name == "int8":
        if len(t.scales) != 4 * B * T:
            raise CodecError(f"int8 needs {B * T} float32 scales ({4 * B * T} bytes), got {len(t.scales)} bytes")
        s = torch.from_numpy(np.frombuffer(t.scales, dtype="<f4").astype(np.float32)).view(B, T, 1)
        h = torch.from_numpy(arr.astype(np.float32)) * s
    else:
        if t.scales:
            raise CodecError(f"scales are only allowed with int8, got {len(t.scales)} bytes with {name}")
        h = torch.from_numpy(arr.copy())
        if name == "bfloat16":
            h = h.view(torch.bfloat16)
    h = h.to(out_dtype)
    if not torch.isfinite(h).all():
        raise CodecError("hidden states contain NaN or Inf")
    return h
