"""Tokenizers: a built-in byte-level one and a byte-level BPE trained locally with `tokenizers`.

Both expose the same small interface (encode, decode, vocab_size, bos/eos/pad ids) and save to and
load from a checkpoint directory with a `tokenizer_config.json` that says which kind it is. Nothing
here downloads anything; chat templates and streaming detokenisation belong to `serving/`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from trunk.artifacts import write_json_atomic

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
CONFIG_FILE = "tokenizer_config.json"


class TokenizerError(ValueError):
    pass


class ByteTokenizer:
    """ids 0..255 are bytes; 256 = bos, 257 = eos, 258 = pad."""

    kind = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def files(self) -> list[str]:
        return [CONFIG_FILE]

    def save(self, directory: str | os.PathLike) -> None:
        write_json_atomic(Path(directory) / CONFIG_FILE, {"type": "byte", "vocab_size": self.vocab_size})


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) from the `tokenizers` library."""

    kind = "bpe"

    def __init__(self, tok, special_ids: dict | None = None):
        """`special_ids` ({"bos","eos","pad"} -> id) names specials of a foreign (e.g. Hugging Face)
        tokenizer.json; by default our own special tokens are looked up."""
        self._tok = tok
        ids = [tok.token_to_id(s) for s in SPECIALS]
        if special_ids:
            ids = [special_ids.get(k, i) for k, i in zip(("bos", "eos", "pad"), ids)]
        if ids[1] is None:
            raise TokenizerError("BPE tokenizer has no end-of-sequence token (" + SPECIALS[1] + ")")
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, in parallel threads inside `tokenizers`."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def files(self) -> list[str]:
        return [CONFIG_FILE, "tokenizer.json"]

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        tmp = d / "tokenizer.json.tmp"
        self._tok.save(str(tmp))
        os.replace(tmp, d / "tokenizer.json")
        write_json_atomic(d / CONFIG_FILE, {"type": "bpe", "vocab_size": self.vocab_size,
                                      "special_ids": {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}})


def load_tokenizer(directory: str | os.PathLike):
    d = Path(directory)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise TokenizerError(f"{cfg_path}: missing tokenizer config")
    try:
        tcfg = json.loads(cfg_path.read_text())
        kind = tcfg["type"]
    except (ValueError, KeyError) as e:
        raise TokenizerError(f"{cfg_path}: unreadable tokenizer config ({e})") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer

        path = d / "tokenizer.json"
        try:
            return BPETokenizer(Tokenizer.from_file(str(path)), tcfg.get("special_ids"))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise TokenizerError(f"{path}: cannot load BPE tokenizer ({e})") from None
    raise TokenizerError(f"{cfg_path}: unknown tokenizer type {kind!r}")


