"""Incremental detokenisation: token ids in one at a time, text deltas out, for any of our tokenizers.

Decoding token by token goes wrong in two ways: a byte-fallback or byte-level token may hold only part
of a UTF-8 character (decoding it alone gives U+FFFD), and SentencePiece-style decoders (Metaspace,
`Strip`) drop the leading space of whatever comes first in a decode call. So each step decodes a short
window: `ids[prefix:read]` (text already emitted, kept as left context) and `ids[prefix:]`; the delta
is the second minus the first, held back while it ends in U+FFFD (the "prefix/read offset" method of
text-generation-inference and vLLM). A step decodes a few tokens, never the whole sequence, so a
completion of n tokens costs O(n) decoding, not O(n^2).

A hold normally lasts at most the 4 bytes of one character. Two streams would hold for ever and let
the window grow: bytes that never form a character (a model writing invalid UTF-8) and runs of tokens
that decode to nothing (special tokens, which `decode` skips). After `MAX_HELD` held ids `_settle`
ends the hold where that provably changes no text, so the window stays short whatever the model writes.

The prompt's last tokens seed the window, so the first generated token keeps its leading space. The
deltas joined equal `decode(prompt + generated)` minus `decode(prompt)` whenever the prompt ends on a
character boundary (any prompt that came from text). Stop strings, EOS and which ids end a completion
belong to the caller (`serving/detokenize.py`).
"""
from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens kept as left context for the first generated token
MAX_HELD = 8        # held ids before a hold is checked for bytes that can never complete a character


class StreamDecoder:
    """`step(id) -> str` gives the new text (possibly ""); `flush()` gives what is still held back."""

    def __init__(self, tokenizer, prompt_ids=()):
        self._decode = tokenizer.decode
        self.ids = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.prefix, self.read = 0, len(self.ids)
        self._prefix_text = self._decode(self.ids)

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            return self._emit(text, len(self.ids))
        # nothing new yet, or an incomplete UTF-8 sequence: wait for its next bytes
        return self._settle(text) if len(self.ids) - self.read > MAX_HELD else ""

    def flush(self) -> str:
        """Text of tokens not yet emitted (an incomplete character decodes as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        return self._emit(self._decode(self.ids[self.prefix:]), len(self.ids))

    def _emit(self, text: str, upto: int) -> str:
        """`text` decodes `ids[prefix:upto]`: send what follows the left context, which moves on."""
        delta = text[len(self._prefix_text):]
        self.prefix, self.read = self.read, upto
        self._prefix_text = self._decode(self.ids[self.prefix:self.read])
        return delta

    def _settle(self, text: str) -> str:
        """End a long hold without changing the text. A newest id that adds nothing to the window's text
        carries no bytes (a skipped special token): it is dropped. Otherwise everything before the
        newest id is sent when decoding the two parts apart gives the window's text: no character is
        split at the cut, so what was held there were bytes no later token can complete."""
        cut = len(self.ids) - 1
        head, tail = self._decode(self.ids[self.prefix:cut]), self._decode(self.ids[cut:])
        if not tail and head == text:
            del self.ids[cut]
        elif tail and head + tail == text and len(head) > len(self._prefix_text):
            return self._emit(head, cut)
        return ""
