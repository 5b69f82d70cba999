"""Regenerate the committed protobuf/gRPC modules from relay.proto (the one way to produce them).

    python3 relay/protos/generate.py            # rewrite relay/protos/familial/relay/v1/*_pb2*.py[i]
    python3 relay/protos/generate.py --out DIR  # write the same files under DIR (the drift test)

grpc_tools writes `from familial.relay.v1 import relay_pb2` into the service module, which only works
with relay/protos on sys.path; we rewrite that one import so the modules import as a package
(`relay.protos.familial.relay.v1`). Nothing else is edited.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO = "familial/relay/v1/relay.proto"
PACKAGE = "relay.protos.familial.relay.v1"
GENERATED = ("relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc} on {PROTO_ROOT / PROTO}")
    pkg_dir = out / "familial" / "relay" / "v1"
    grpc_mod = pkg_dir / "relay_pb2_grpc.py"
    src = grpc_mod.read_text()
    fixed = src.replace("from familial.relay.v1 import relay_pb2", f"from {PACKAGE} import relay_pb2")
    if fixed == src:
        raise SystemExit(f"{grpc_mod}: expected import 'from familial.relay.v1 import relay_pb2' not found")
    grpc_mod.write_text(fixed)
    return [pkg_dir / name for name in GENERATED]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=PROTO_ROOT, help="root to write familial/relay/v1/ under")
    args = ap.parse_args(argv)
    for p in generate(args.out):
        print(p)


if __name__ == "__main__":
    main(sys.argv[1:])
