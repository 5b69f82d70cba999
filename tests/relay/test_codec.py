"""Wire codec: exact round trips for float formats, int8 error bound, and refusal of bad tensors."""
import numpy as np
import pytest
import torch

from relay import codec
from relay.codec import CodecError
from relay.pb import pb


@pytest.mark.parametrize("T,D", [(1, 9), (41, 64), (3, 341)])
@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_float_round_trip_is_exact_in_the_wire_dtype(wire, T, D):
    h = torch.randn(1, T, D) * 3
    td = codec.WIRE_DTYPES[wire][1]
    t = codec.encode(h.to(td), wire)
    assert len(t.data) == T * D * codec.WIRE_DTYPES[wire][2]
    back = codec.decode(t, d_model=D, out_dtype=td)
    assert back.dtype == td and torch.equal(back, h.to(td))


def test_int8_per_token_scales_bound_the_error():
    h = torch.randn(1, 17, 256) * torch.logspace(-2, 2, 17).view(1, 17, 1)  # rows of very different scale
    t = codec.encode(h, "int8")
    assert len(t.data) == 17 * 256 and len(t.scales) == 17 * 4
    back = codec.decode(t, d_model=256)
    # symmetric rounding: |x - q*s| <= s/2 with s = max|x_row| / 127
    bound = h.abs().amax(-1, keepdim=True) / 127 / 2 + 1e-6
    assert ((back - h).abs() <= bound).all()


def test_little_endian_layout():
    t = codec.encode(torch.tensor([[[1.0, -2.0]]]), "float32")
    assert t.data == np.array([1.0, -2.0], "<f4").tobytes()


@pytest.mark.parametrize("bad", [
    dict(dtype=0), dict(dtype=9), dict(shape=[1, 2]), dict(shape=[2, 1, 4]), dict(shape=[1, 0, 4]),
    dict(data=b"\0" * 7), dict(scales=b"\0" * 4), dict(data=np.full(4, np.nan, "<f4").tobytes()),
])
def test_decode_refuses_malformed(bad):
    t = pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1, 4], data=b"\0" * 16)
    for k, v in bad.items():
        if k == "shape":
            del t.shape[:]
            t.shape.extend(v)
        else:
            setattr(t, k, v)
    with pytest.raises(CodecError):
        codec.decode(t, d_model=4)


def test_decode_refuses_wrong_width_and_too_many_positions():
    t = codec.encode(torch.zeros(1, 5, 8), "float16")
    with pytest.raises(CodecError, match="d_model"):
        codec.decode(t, d_model=16)
    with pytest.raises(CodecError, match="exceed"):
        codec.decode(t, d_model=8, max_positions=4)
