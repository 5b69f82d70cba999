"""`familial-train`: the command line of the data preparer and the trainer.

    familial-train prepare INPUT... --out DIR [--tokenizer byte|bpe|DIR --vocab-size N]
    familial-train prepare --preset pycorpus --out DIR [--tokenizer bpe --vocab-size N]
    familial-train [train] --config run.yaml [--flag value ...]
    familial-train sweep SWEEP.yaml [--dry-run] [--jobs N]     (trunk/sweep_cli.py)
    familial-train import-hf HF_DIR --exits 8,16 --out FAMILY_DIR     (trunk/hf_cli.py)
    familial-train export-hf FAMILY_DIR --out DIR

A config file (YAML or JSON) is {"model": {FamilyConfig fields, or "preset": NAME plus overrides},
"train": {TrainConfig fields}}; flags override it. Every user error (bad config, missing data, budget
too small) ends as one line on stderr and exit code 2, never a traceback (`trunk/cmdline.py`, the
convention of every familial-* tool). This file only parses and reports; the work is in
`trunk/data.py`, `trunk/corpus.py`, `trunk/train.py` and the sweep files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from trunk import hf_cli
from trunk.cmdline import CLIError, Parser, run, warn
from trunk.adapt import AdaptError, init_config
from trunk.checkpoint import CheckpointError
from trunk.config import ConfigError, FamilyConfig
from trunk.corpus import PRESETS, PY_EXTS
from trunk.data import DEFAULT_EXTS, DataError
from trunk.hf import HFExportError, HFImportError
from trunk.sweep import SweepError
from trunk.tokenizer import ByteTokenizer, TokenizerError
from trunk.train import TrainConfig, TrainError

PROG = "familial-train"
USER_ERRORS = (ConfigError, TrainError, DataError, CheckpointError, TokenizerError, HFImportError, HFExportError,
               AdaptError, SweepError)
_BUDGET = ("steps", "tokens", "flops")


def _prepare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="tokenize text files, folders or JSONL into token shards",
                       description="Tokenize text into memory-mapped token shards with a held-out validation split.")
    p.add_argument("inputs", nargs="*", help="text files, folders (searched recursively) or .jsonl files with a \"text\" field")
    p.add_argument("--preset", choices=PRESETS, help="a named corpus instead of INPUTs: pycorpus = the installed "
                   "Python standard library + site-packages (.py .pyi .rst .md .txt), deduplicated by content hash")
    p.add_argument("--max-bytes", type=int, default=0, help="preset only: stop after this many unique bytes (0 = all)")
    p.add_argument("--max-file-bytes", type=int, default=1 << 20, help="preset only: skip files larger than this")
    p.add_argument("--tokenizer-from", default="", metavar="DIR",
                   help="reuse the tokenizer saved in DIR (a data or checkpoint directory) instead of training one")
    p.add_argument("--out", required=True, help="output data directory (shards, index.json, tokenizer files)")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|DIR",
                   help="built-in byte-level tokenizer, a byte-level BPE trained here on the train split, or the "
                        "tokenizer of a family/model directory (e.g. one made by import-hf)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size, special tokens included (bpe only)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation")
    p.add_argument("--ext", default=None, help="comma-separated file extensions to read (default: "
                   f"{','.join(DEFAULT_EXTS)} from folders; {','.join(PY_EXTS)} for --preset pycorpus)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip folder entries whose path relative to the folder matches GLOB (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file before starting a new one")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a family (the default subcommand)",
                       description="Train a familial model: weighted mean of exit cross-entropies, AdamW, "
                                   "warmup + cosine. Run under torchrun for DDP or FSDP2 (--parallel). With --init "
                                   "FAMILY_DIR --train exits, adapt the exit heads of an imported model with its trunk frozen.")
    p.add_argument("--config", help="YAML or JSON file {model: {...}, train: {...}}; flags override it")
    g = p.add_argument_group("model (override the config's model section)")
    g.add_argument("--preset", help="start the model from this named preset (trunk/config.py PRESETS)")
    g.add_argument("--exit-layers", help="comma-separated shallow exit layers, e.g. 2,4 ('' = no shallow exits)")
    g.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="set any FamilyConfig field, value parsed as JSON when it can be (repeatable)")
    g = p.add_argument_group("training (override the config's train section)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default in (None, "", [], ()) else f" (default: {default})"
        kw = {"help": f"{f.metadata['help']}{shown}".replace("%", "%%"), "default": None,
              "dest": f.name}  # None = not given: the config file's value (or the default) stands
        if f.type in ("bool", bool):
            g.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "exit_weights":
            g.add_argument(_flag(f.name), type=float, nargs="+", **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            g.add_argument(_flag(f.name), type=typ, **kw)
    return p


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = Parser(prog=PROG, description="Prepare data for and train familial (multi-exit) language models. "
                                           "With no subcommand, `train` is assumed.",
                    epilog=f"`{PROG} --help` shows every subcommand's options below; `{PROG} SUBCOMMAND --help` "
                           "shows one.")
    sub = parser.add_subparsers(dest="command", title="subcommands",
                                metavar="{prepare,train,sweep,import-hf,export-hf}")
    from trunk.sweep_cli import add_parser as sweep_parser

    return parser, {"prepare": _prepare_parser(sub), "train": _train_parser(sub), "sweep": sweep_parser(sub),
                    **hf_cli.add_parsers(sub)}


# ---- config assembly ---------------------------------------------------------------------------

def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{path}: config file not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            cfg = yaml.safe_load(text) or {}
        else:
            cfg = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both mean "unparseable"
        raise TrainError(f"{path}: cannot parse config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise TrainError(f"{path}: config must be a mapping with 'model' and 'train' sections")
    unknown = sorted(set(cfg) - {"model", "train"})
    if unknown:
        raise TrainError(f"{path}: unknown config section(s) {', '.join(unknown)}; expected 'model' and 'train'")
    for k in ("model", "train"):
        if not isinstance(cfg.get(k, {}), dict):
            raise TrainError(f"{path}: '{k}' must be a mapping")
    return cfg


def _model_overrides(args) -> dict:
    over = {}
    if args.preset:
        over["preset"] = args.preset
    if args.exit_layers is not None:
        over["exit_layers"] = [int(x) for x in args.exit_layers.split(",") if x.strip()]
    for kv in args.model:
        if "=" not in kv:
            raise TrainError(f"--model expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except ValueError:
            over[k] = v
    return over


def resolve_configs(args) -> tuple[FamilyConfig, TrainConfig]:
    file_cfg = load_config_file(args.config) if args.config else {}
    model = dict(file_cfg.get("model", {}))
    over = _model_overrides(args)
    model.update(over)  # a --preset flag keeps the file's explicit fields as overrides
    train = dict(file_cfg.get("train", {}))
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    if any(k in flags for k in _BUDGET):  # a budget flag replaces the file's budget
        for k in _BUDGET:
            train.pop(k, None)
    train.update(flags)
    tcfg = TrainConfig.from_dict(train)
    if tcfg.init:  # the architecture is the checkpoint's
        if model:
            raise TrainError("--init takes the architecture from its checkpoint; drop --preset, --exit-layers, "
                             "--model and the config's model section")
        return init_config(tcfg.init), tcfg
    return FamilyConfig.from_dict(model), tcfg


# ---- entry -------------------------------------------------------------------------------------

def _exts(spec: str) -> tuple[str, ...]:
    return tuple(e if e.startswith(".") else "." + e for e in spec.split(",") if e)


def _prepare(args) -> int:
    from trunk.data import prepare, prepare_documents

    common = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                  seed=args.seed, shard_tokens=args.shard_tokens, progress=not args.no_progress,
                  tokenizer_from=args.tokenizer_from)
    if args.tokenizer_from:  # fail before reading a large corpus
        from trunk.tokenizer import load_tokenizer

        load_tokenizer(args.tokenizer_from)
    if args.preset:
        from trunk.corpus import python_corpus

        if args.inputs:
            raise CLIError("give either INPUT paths or --preset, not both")
        corpus = python_corpus(exts=_exts(args.ext) if args.ext else PY_EXTS, max_file_bytes=args.max_file_bytes,
                               max_bytes=args.max_bytes, progress=not args.no_progress)
        if not corpus.documents:
            raise DataError(f"preset {args.preset}: no documents under {', '.join(corpus.roots)}")
        index = prepare_documents(corpus.documents, args.out, sources=corpus.roots, extra={"corpus": corpus.summary()},
                                  **common)
    else:
        if not args.inputs:
            raise CLIError("prepare needs INPUT paths or --preset NAME")
        exts = _exts(args.ext) if args.ext else DEFAULT_EXTS
        index = prepare(args.inputs, args.out, exts=exts, exclude=tuple(args.exclude), **common)
    s = index["splits"]
    print(f"{args.out}: {s['train']['tokens']} train + {s['val']['tokens']} val tokens "
          f"({s['train']['documents']} + {s['val']['documents']} documents), {index['tokenizer']['type']} "
          f"vocab {index['vocab_size']}")
    short = _vocab_shortfall(args, index)
    if short:
        warn(PROG, short)
    return 0


def _vocab_shortfall(args, index: dict) -> str | None:
    """Why a BPE vocabulary came out smaller than --vocab-size, or None if it did not.

    The trainer merges the most frequent adjacent pair inside words (GPT-2 pre-tokenisation) until the
    vocabulary is full or no word has two tokens left; a small corpus reaches the second first."""
    got, want = index["vocab_size"], args.vocab_size
    if index["tokenizer"]["type"] != "bpe" or args.tokenizer_from or got >= want:
        return None
    docs = index["splits"]["train"]["documents"]
    merges = got - ByteTokenizer.vocab_size  # the BPE starts from the 256 bytes and the special tokens
    return (f"BPE vocabulary is {got}, not the requested --vocab-size {want}: after {merges} merges every distinct "
            f"word in the training split ({docs} documents) is a single token, so no pair was left to merge; "
            f"give more text, or ask for --vocab-size {got} or less to make this explicit")



def _run(argv: list[str]) -> int:
    parser, subs = build_parser()
    if argv in (["-h"], ["--help"]):
        parser.print_help()
        for name, p in subs.items():
            print(f"\n{'=' * 20} {PROG} {name} {'=' * 20}")
            p.print_help()
        return 0
    if not argv or argv[0] not in subs:
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    if args.command in hf_cli.COMMANDS:
        return hf_cli.run(args)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "sweep":
        from trunk.sweep_cli import run_sweep

        return run_sweep(args)
    from trunk.train import train

    mcfg, tcfg = resolve_configs(args)
    rec = train(mcfg, tcfg)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = ", ".join(f"{v:.4f}" for v in rec["exit_val_loss"])
        print(f"{tcfg.out}: {rec['steps']} steps, D={rec['D']}, exit val loss [{losses}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(PROG, lambda: _run(argv), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
