"""The committed generated modules are exactly what relay/protos/generate.py produces (no drift)."""
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "relay" / "protos" / "familial" / "relay" / "v1"


def test_generated_modules_match_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    gen = importlib.import_module("relay.protos.generate")
    for fresh in gen.generate(tmp_path):
        committed = PKG / fresh.name
        assert committed.is_file(), f"{committed} is missing; run python3 relay/protos/generate.py"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.relative_to(ROOT)} differs from what relay.proto generates; "
            "run python3 relay/protos/generate.py and commit the result")


def test_generated_modules_import_as_package():
    from relay.pb import pb, pb_grpc
    assert pb.DESCRIPTOR.package == "familial.relay.v1"
    assert hasattr(pb_grpc, "RelayStub") and hasattr(pb_grpc, "RelayServicer")
