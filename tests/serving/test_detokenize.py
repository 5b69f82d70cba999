"""Incremental detokenisation: `trunk.detokenize.StreamDecoder` (text deltas equal to a whole decode,
partial UTF-8 held back, a short decode window per token whatever the stream holds) and
`serving.detokenize.TextStream` on top of it (EOS, stop strings, hold-back of a possible stop)."""
from __future__ import annotations

import random

import pytest

from serving.detokenize import TextStream, holdback
from trunk.builtin import builtin_path
from trunk.detokenize import CONTEXT_TOKENS, MAX_HELD, StreamDecoder
from trunk.tokenizer import ByteTokenizer, load_tokenizer

# A window is the left context (at most the last emitted run) plus the held ids; neither outgrows
# MAX_HELD plus the 4 bytes of one character, so this bound holds for any stream.
WINDOW_BOUND = CONTEXT_TOKENS + 2 * (MAX_HELD + 4)


class Counting:
    """A tokenizer whose `decode` records how many ids each call decoded."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []
        self.eos_ids, self.vocab_size = tok.eos_ids, tok.vocab_size

    def decode(self, ids):
        ids = list(ids)
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


@pytest.fixture(scope="module")
def builtin_tok():
    return load_tokenizer(builtin_path())


def stream(tok, ids, prompt=()) -> list[str]:
    s = StreamDecoder(tok, prompt)
    return [s.step(i) for i in ids] + [s.flush()]


def test_multibyte_characters_split_across_tokens():
    tok = ByteTokenizer()
    text = "a€b😀é"                                    # 3-, 4- and 2-byte characters, one byte per token
    deltas = stream(tok, tok.encode(text))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)      # partial characters are held back, never sent
    assert [d for d in deltas if d] == ["a", "€", "b", "😀", "é"]


def test_builtin_bpe_splits_a_character_and_streams_it_whole(builtin_tok):
    text = "naïve café — “quoted” 😀 done"
    ids = builtin_tok.encode(text)
    assert any("\ufffd" in builtin_tok.decode([i]) for i in ids)   # some token holds part of a character
    deltas = stream(builtin_tok, ids)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_special_tokens_add_nothing(builtin_tok):
    tok = builtin_tok
    euro = tok.encode("€")
    specials = [tok.bos_id, tok.pad_id, tok.eos_id]
    ids = tok.encode("x = ") + specials + euro[:1] + specials + euro[1:] + tok.encode(" y") + specials
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "x = € y"
    assert not any("\ufffd" in d for d in deltas)      # a special between a character's bytes keeps it whole


def test_long_runs_that_never_make_text_keep_the_window_short():
    tok = Counting(ByteTokenizer())
    ids = [ord("a")] + [tok.tok.pad_id] * 300 + [0x80] * 300 + [0xE2, 0x82] + [tok.tok.bos_id] * 50 + [0xAC]
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.tok.decode(ids)
    assert sum(len(d) for d in deltas[:-1]) >= 290     # invalid bytes stream as U+FFFD, not all at the flush
    assert deltas[-2].endswith("€") and deltas[-1] == ""   # the bytes around the specials made one character
    assert max(tok.lengths) <= WINDOW_BOUND, max(tok.lengths)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_id_streams_equal_a_whole_decode(builtin_tok, seed):
    """Random ids of the built-in tokenizer: byte-level pieces that split or break characters, special
    tokens, anything. The deltas joined equal one decode of all the ids, with and without a prompt."""
    tok = Counting(builtin_tok)
    rng = random.Random(seed)
    specials = [builtin_tok.bos_id, builtin_tok.eos_id, builtin_tok.pad_id]
    prompts = ["", "def f(x):\n    return", "café", " 😀"]
    for trial in range(150):
        n = rng.randrange(1, 120)
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(builtin_tok.vocab_size)
               for _ in range(n)]
        prompt = builtin_tok.encode(prompts[trial % len(prompts)])
        got = "".join(stream(tok, ids, prompt))
        full, head = builtin_tok.decode(prompt + ids), builtin_tok.decode(prompt)
        assert full.startswith(head) and got == full[len(head):], (prompt, ids)
    assert max(tok.lengths) <= WINDOW_BOUND, max(tok.lengths)


def test_decoding_cost_is_linear_in_the_completion(builtin_tok):
    tok = Counting(builtin_tok)
    rng = random.Random(7)
    ids = [rng.randrange(builtin_tok.vocab_size) for _ in range(2000)]
    assert "".join(stream(tok, ids)) == builtin_tok.decode(ids)
    assert sum(tok.lengths) <= 6 * WINDOW_BOUND * len(ids)   # a whole re-decode per token would be ~n^2/2


# ---- serving.detokenize.TextStream ---------------------------------------------------------------

def feed(ts: TextStream, ids, last_reason=None) -> list[str]:
    out = []
    for k, i in enumerate(ids):
        out.append(ts.add(i, last_reason if k == len(ids) - 1 else None))
        if ts.finish_reason:
            break
    return out


def test_stop_string_split_across_tokens_is_cut_and_held_back():
    tok = ByteTokenizer()
    ts = TextStream(tok, tok.encode("Q:"), stops=["\nUser:"])
    out = feed(ts, tok.encode("yes\nUs") + tok.encode("er: more"))
    assert "".join(out[:4]) == "yes"                     # "\nUs…" is held back: it may start the stop
    assert out[3:6] == ["", "", ""]
    assert "".join(out) == "yes" and ts.finish_reason == "stop"


def test_held_back_text_is_sent_when_it_is_not_a_stop():
    tok = ByteTokenizer()
    ts = TextStream(tok, (), stops=["abc"])
    assert feed(ts, tok.encode("xab")) == ["x", "", ""]
    assert ts.add(ord("d")) == "abd" and ts.finish_reason is None


def test_eos_ends_the_completion_unless_ignored():
    tok = ByteTokenizer()
    ts = TextStream(tok, (), stops=[])
    assert feed(ts, [*tok.encode("hi"), tok.eos_id, *tok.encode("more")]) == ["h", "i", ""]
    assert ts.finish_reason == "stop"
    ts = TextStream(tok, (), ignore_eos=True)
    out = feed(ts, [*tok.encode("hi"), tok.eos_id, *tok.encode("!")], last_reason="length")
    assert "".join(out) == "hi!" and ts.finish_reason == "length"


def test_engine_finish_flushes_a_partial_character_and_flush_ends_a_cut_short_stream():
    tok = ByteTokenizer()
    ts = TextStream(tok, ())
    euro = tok.encode("€")
    out = feed(ts, [ord("a"), *euro[:2]], last_reason="length")
    assert out == ["a", "", "\ufffd"] and ts.finish_reason == "length"
    ts = TextStream(tok, (), stops=["a€x"])
    feed(ts, [ord("a"), *euro[:2]])
    assert ts.finish_reason is None and ts.flush() == "a\ufffd"


def test_holdback():
    assert holdback("hello\nUs", ["\nUser:"]) == 3
    assert holdback("hello", ["\nUser:"]) == 0
    assert holdback("ab", ["abc", "bz"]) == 2
