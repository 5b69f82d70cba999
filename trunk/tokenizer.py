"""Tokenizers: a built-in byte-level one, a byte-level BPE trained locally with `tokenizers`, and a
Hugging Face model's own fast tokenizer (`tokenizer.json` + `tokenizer_config.json`) kept as shipped.

All expose the same small interface (encode, decode, vocab_size, bos/eos/pad ids, `eos_ids`: every id
that ends a sequence) and save to and load from a checkpoint directory. Ours write a
`tokenizer_config.json` whose "type" says which kind it is; a `tokenizer_config.json` without "type"
next to a `tokenizer.json` is a Hugging Face tokenizer, whose files are copied byte for byte (with the
EOS list from `generation_config.json` and the chat template, if present). Nothing here downloads
anything. Chat templates render in `trunk/chat_template.py`; streaming decoding is
`trunk/detokenize.py`; which template the built-in tokenizers use is `serving/`'s business.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from trunk.artifacts import write_json_atomic

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
CONFIG_FILE = "tokenizer_config.json"
HF_OPTIONAL_FILES = ("special_tokens_map.json", "chat_template.jinja", "generation_config.json")


class TokenizerError(ValueError):
    pass


class ByteTokenizer:
    """ids 0..255 are bytes; 256 = bos, 257 = eos, 258 = pad."""

    kind = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    eos_ids = (257,)

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
        self.eos_ids = (self.eos_id,)
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


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face fast tokenizer as the model shipped it. `encode` applies tokenizer.json's
    post-processor (BOS for Llama, nothing for Qwen2), as `transformers`' `tokenizer(text)` does;
    `apply_chat_template` renders the model's template and encodes it without adding specials."""

    kind = "hf"
    SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

    def __init__(self, tok, config: dict, files: dict[str, bytes]):
        self._tok, self.config, self._files = tok, config, dict(files)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {k: _token_text(config.get(k)) for k in self.SPECIAL_KEYS}
        self.bos_id = self._id("bos_token")
        self.pad_id = self._id("pad_token")
        eos = [self._id("eos_token")] + _generation_eos(files.get("generation_config.json"))
        self.eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        if not self.eos_ids:
            raise TokenizerError("Hugging Face tokenizer has no end-of-sequence token (eos_token in "
                                 "tokenizer_config.json or eos_token_id in generation_config.json)")
        self.eos_id = self.eos_ids[0]
        from trunk.chat_template import pick_template

        jinja = files.get("chat_template.jinja")
        self.chat_template = jinja.decode("utf-8") if jinja is not None else pick_template(config.get("chat_template"))

    def _id(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        return None if text is None else self._tok.token_to_id(text)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        from tokenizers import Tokenizer

        d = Path(directory)
        files = {name: (d / name).read_bytes() for name in (CONFIG_FILE, "tokenizer.json", *HF_OPTIONAL_FILES)
                 if (d / name).is_file()}
        try:
            config = json.loads(files[CONFIG_FILE])
            tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except KeyError as e:
            raise TokenizerError(f"{d}: missing {e.args[0]}") from None
        except Exception as e:  # json and the tokenizers library raise their own types
            raise TokenizerError(f"{d}: cannot load Hugging Face tokenizer ({e})") from None
        return cls(tok, config, files)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the templated conversation, ready for generation; TokenizerError if there is no
        template or the template refuses the messages."""
        from trunk.chat_template import ChatTemplateError, render_chat

        if not self.chat_template:
            raise TokenizerError("this model's tokenizer has no chat template")
        try:
            text = render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt)
        except ChatTemplateError as e:
            raise TokenizerError(str(e)) from None
        return self._tok.encode(text, add_special_tokens=False).ids

    def files(self) -> list[str]:
        return sorted(self._files)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        for name, data in self._files.items():
            tmp = d / (name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, d / name)


def _generation_eos(raw: bytes | None) -> list[int]:
    if raw is None:
        return []
    try:
        eos = json.loads(raw).get("eos_token_id")
    except (ValueError, AttributeError):
        raise TokenizerError("generation_config.json: not a JSON object") from None
    return [eos] if isinstance(eos, int) else [int(i) for i in eos or []]


def load_tokenizer(directory: str | os.PathLike):
    d = Path(directory)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise TokenizerError(f"{cfg_path}: missing tokenizer config")
    try:
        tcfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise TokenizerError(f"{cfg_path}: unreadable tokenizer config ({e})") from None
    if not isinstance(tcfg, dict):
        raise TokenizerError(f"{cfg_path}: tokenizer config must be a JSON object")
    kind = tcfg.get("type")
    if kind is None and (d / "tokenizer.json").is_file():
        return HFTokenizer.load(d)
    if kind is None:
        raise TokenizerError(f"{cfg_path}: no \"type\" (ours) and no tokenizer.json next to it (Hugging Face)")
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
