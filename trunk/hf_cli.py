"""`familial-train import-hf` and `familial-train export-hf`: the command line of `trunk/hf.py`.

    familial-train import-hf HF_DIR --exits 8,16 [--branch-layers K] --out FAMILY_DIR
    familial-train export-hf FAMILY_DIR --out DIR

`trunk/cli.py` registers these subcommands and turns their errors into one line; this file only
parses flags and prints a summary. The mapping itself is in `trunk/hf.py` and `trunk/ruyi.py`.
"""
from __future__ import annotations

import argparse

from trunk.checkpoint import DTYPES

COMMANDS = ("import-hf", "export-hf")


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def add_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    imp = sub.add_parser("import-hf", help="turn a local Hugging Face Llama/Qwen2/Mistral or Ruyi model into a family",
                         description="Import a local Hugging Face checkpoint (config.json, safetensors, tokenizer.json "
                                     "+ tokenizer_config.json) as a family checkpoint with shallow exits.")
    imp.add_argument("hf_dir", help="local model directory (no hub downloads)")
    imp.add_argument("--out", required=True, help="family checkpoint directory to write")
    imp.add_argument("--exits", type=_layers, default=[], help="comma-separated shallow exit layers, e.g. 8,16 (Ruyi: a subset "
                                                 "of its early_exit_points; empty = all of them)")
    imp.add_argument("--branch-layers", type=int, help="decoder layers in each new exit head, copied from the "
                                                       "trunk layers after the exit (default: 0; Ruyi: fixed at 1)")
    imp.add_argument("--adapter-rank", type=int, help="low-rank adapter in each new exit head (default: 0 = none)")
    imp.add_argument("--exit-unembed", choices=("tied", "own"),
                     help="new exits share the final LM head (tied) or start from a copy (own) (default: tied)")
    imp.add_argument("--format", choices=("auto", "hf", "ruyi"), default="auto",
                     help="checkpoint layout; auto detects Ruyi from config.json (model_type ruyi_qwen2)")
    imp.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="dtype of the family's weights (auto = the model's own dtype)")
    exp = sub.add_parser("export-hf", help="write a family's trunk and exits as Hugging Face models",
                         description="Write DIR/final (the trunk) and DIR/exit-G for each shallow exit without an "
                                     "adapter, each loadable by transformers' AutoModelForCausalLM.")
    exp.add_argument("family_dir", help="family checkpoint directory")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--arch", choices=("auto", "llama", "qwen2"), default="auto",
                     help="Hugging Face architecture (auto: qwen2 if the family has q/k/v biases, else llama)")
    return {"import-hf": imp, "export-hf": exp}


def run(args) -> int:
    from trunk.hf import export_family, import_hf

    if args.command == "export-hf":
        for e in export_family(args.family_dir, args.out, args.arch):
            if e["dir"] is None:
                print(f"exit {e['exit']}: skipped ({e['skipped']})")
            else:
                tok = "" if e["tokenizer"] else " (no Hugging Face tokenizer: byte-level)"
                print(f"exit {e['exit']}: {e['dir']} ({e['layers']} layers){tok}")
        return 0
    kw = {k: v for k, v in (("branch_layers", args.branch_layers), ("adapter_rank", args.adapter_rank),
                            ("exit_unembed", args.exit_unembed)) if v is not None}
    r = import_hf(args.hf_dir, args.out, args.exits, fmt=args.format, save_dtype=args.dtype, **kw)
    c = r["config"]
    print(f"{r['out']}: {r['source']['architecture']} ({r['source']['format']}), {c.n_layers} layers, exits at "
          f"{list(c.exits)} (+{c.branch_layers} branch layers each), {r['params'] / 1e6:.1f}M parameters, {r['dtype']}")
    return 0
