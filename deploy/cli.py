"""`familial-deploy`: split a checkpoint into stage shards, export a tier to ONNX, verify a shard dir.

    familial-deploy split CKPT --out DIR [--tiers device=0,edge=1,cloud=2..] [--dtype float16]
    familial-deploy export-onnx DIR --tier device [--check]
    familial-deploy verify DIR

Exit status: 0 on success; 2 with one line on stderr for bad input of any kind (bad flags, a
directory that is not a checkpoint, a tier spec that does not cover the shards, a shard whose hash
or shapes disagree with its manifest, an ONNX check over tolerance).
"""
from __future__ import annotations

import json
import sys

from trunk.checkpoint import DTYPES
from trunk.cmdline import CLIError, Parser, run

PROG = "familial-deploy"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Turn a familial checkpoint into tier stage shards: split it, export a tier "
                                      "to ONNX, verify a shard directory.")
    sub = p.add_subparsers(dest="cmd", required=True, title="subcommands", metavar="{split,export-onnx,verify}")

    s = sub.add_parser("split", help="write per-shard safetensors + manifest.json",
                       description="Split a checkpoint into per-shard safetensors and a manifest.json naming each "
                                   "tier's shards, with byte sizes and sha256.")
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint directory (model.safetensors + family.json)")
    s.add_argument("--out", required=True, help="output shard directory (created if missing)")
    s.add_argument("--tiers", default=None,
                   help="tier=shards, shallow to deep, covering every shard: e.g. device=0,edge=1,cloud=2.. "
                        "(ranges: k, a-b, a..b, a..) (default: device=0,edge=1,cloud=2..)")
    s.add_argument("--dtype", choices=list(DTYPES), default=None, help="shard dtype (default: the checkpoint's)")

    e = sub.add_parser("export-onnx", help="export a tier to ONNX with KV-cache inputs/outputs",
                       description="Export one tier of a shard directory to ONNX with KV-cache inputs and outputs.")
    e.add_argument("dir", metavar="DIR", help="shard directory made by `split`")
    e.add_argument("--tier", default="device", help="tier to export")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    e.add_argument("--check", action="store_true",
                   help="compare ONNX Runtime with PyTorch on random prompts + decode steps; "
                        "record the max abs diff in the manifest and fail (exit 2) over tolerance")
    e.add_argument("--tol", type=float, default=1e-4, help="max abs logits diff allowed by --check")
    e.add_argument("--seed", type=int, default=0, help="seed of --check's random prompts")

    v = sub.add_parser("verify", help="check manifest, tokenizer files and every shard's sha256 and shapes",
                       description="Check a shard directory: manifest, tokenizer files, every shard's sha256 and "
                                   "shapes.")
    v.add_argument("dir", metavar="DIR", help="shard directory made by `split`")
    return p


def _run(args) -> int:
    if args.cmd == "split":
        from deploy.shards import split_checkpoint

        m = split_checkpoint(args.ckpt, args.out, args.tiers, args.dtype)
        for t in m.tiers:
            size = sum(m.shards[k].bytes for k in t.shards)
            print(f"{t.name}: shards {t.shards}  {size / 2**20:.2f} MiB")
        print(f"wrote {args.out}/manifest.json")
    elif args.cmd == "verify":
        from deploy.shards import verify_dir

        m = verify_dir(args.dir)
        print(f"ok: {len(m.shards)} shards, tiers {', '.join(t.name for t in m.tiers)}")
    elif args.cmd == "export-onnx":
        from deploy.onnx_export import check_tier, export_tier

        info = export_tier(args.dir, args.tier, opset=args.opset)
        print(f"wrote {info.file}")
        if args.check:
            rep = check_tier(args.dir, args.tier, seed=args.seed, tol=args.tol)
            print(json.dumps(rep["summary"]))
            if not rep["summary"]["ok"]:
                raise CLIError(f"ONNX differs from PyTorch by {rep['summary']['max_abs_diff']:.3g} > {args.tol:g}")
    return 0


def main(argv=None) -> int:
    from deploy.manifest import ShardError, TierSpecError
    from trunk.checkpoint import CheckpointError

    errors = (ShardError, TierSpecError, CheckpointError, OSError)
    return run(PROG, lambda: _run(build_parser().parse_args(argv)), errors)


if __name__ == "__main__":
    sys.exit(main())
