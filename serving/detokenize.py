"""One completion's text, token by token: which ids end it, where stop strings cut it, and how much of
the decoded text can be sent now.

`TextStream.add(token_id)` gives the text safe to send after that token. Decoding is
`trunk.detokenize.StreamDecoder` (a short window per token, partial UTF-8 held back); on top of it this
file holds the completion's rules, which belong to serving rather than to the tokenizer:
- any of the tokenizer's `eos_ids` ends the completion ("stop") and is not decoded, unless the request
  says `ignore_eos`;
- a stop string ends it ("stop") and is cut off with everything after it;
- text that could be the start of a stop string is held back until the next tokens tell.
Only the unsent tail is kept, so every token costs the same however long the completion grows.
Nothing here knows about the engine, HTTP or metrics.
"""
from __future__ import annotations

from trunk.detokenize import StreamDecoder


def holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could start a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class TextStream:
    """Text deltas of one completion. After each `add`, `finish_reason` is None while it goes on, else
    "stop" (EOS or a stop string) or the engine's reason ("length"); the text returned then is the last.
    `flush()` ends a completion the engine cut short: everything still held back, undecodable bytes as
    U+FFFD, stop strings not applied."""

    def __init__(self, tokenizer, prompt_ids=(), stops: list[str] | tuple = (), ignore_eos: bool = False):
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.eos_ids = frozenset(tokenizer.eos_ids)   # a model may end on any of several ids
        self.stops = [s for s in stops if s]      # "" would match at once
        self.ignore_eos = ignore_eos
        self.pending = ""             # decoded, not yet sent; never holds a whole stop string
        self.finish_reason: str | None = None

    def add(self, token_id: int, finish_reason: str | None = None) -> str:
        """Feed one generated id (`finish_reason`: the engine's, when this was its last token)."""
        eos = token_id in self.eos_ids
        if not eos:
            self.pending += self.decoder.step(token_id)
        finish = "stop" if eos and not self.ignore_eos else finish_reason
        if finish:
            self.pending += self.decoder.flush()
        hit = self._find_stop()
        if hit is not None:
            self.pending, self.finish_reason = self.pending[:hit], "stop"
        elif finish:
            self.finish_reason = finish
        if self.finish_reason:
            return self._take(len(self.pending))
        return self._take(len(self.pending) - holdback(self.pending, self.stops))

    def flush(self) -> str:
        self.pending += self.decoder.flush()
        return self._take(len(self.pending))

    def _find_stop(self) -> int | None:
        # a stop string never starts in text already sent: `holdback` kept any possible start
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        return min(hits) if hits else None

    def _take(self, n: int) -> str:
        out, self.pending = self.pending[:n], self.pending[n:]
        return out
