"""Incremental detokenisation: token ids in one at a time, text deltas out, for any of our tokenizers.

Decoding token by token goes wrong in two ways: a byte-fallback or byte-level token may hold only part
of a UTF-8 character (decoding it alone gives U+FFFD), and SentencePiece-style decoders (Metaspace,
`Strip`) drop the leading space of whatever comes first in a decode call. So each step decodes a short
window: `ids[prefix:read]` (text already emitted, kept as left context) and `ids[prefix:]`; the delta
is the second minus the first, held back while it ends in U+FFFD (the "prefix/read offset" method of
text-generation-inference and vLLM). A step decodes a few tokens, never the whole sequence.
The prompt's last tokens seed the window, so the first generated token keeps its leading space.
Stop strings, EOS and special-token policy belong to the caller (`serving/`).
"""
from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens kept as left context for the first generated token


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
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence: wait for its next bytes
        return self._emit(text)

    def flush(self) -> str:
        """Text of tokens not yet emitted (an incomplete character decodes as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        return self._emit(self._decode(self.ids[self.prefix:]))

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self.prefix:self.read])
        return delta
