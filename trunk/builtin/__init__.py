"""The built-in family: a small checkpoint trained on the Python standard library (see README.md here).

Only locates the files; load them with `trunk.checkpoint.load_checkpoint(builtin_path())`.
"""
from pathlib import Path


def builtin_path() -> Path:
    """Directory of the committed built-in checkpoint (model.safetensors, family.json, tokenizer files)."""
    return Path(__file__).resolve().parent
