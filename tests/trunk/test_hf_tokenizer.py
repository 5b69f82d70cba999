"""Hugging Face tokenizers end to end: ids, chat template and EOS list as `transformers` has them,
incremental decoding (byte fallback, Metaspace spaces, byte-level) equal to whole-sequence decoding,
and the files travelling through save/load and `prepare --tokenizer DIR`."""
from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from tests.trunk.hf_models import save_tokenizer  # noqa: E402
from trunk.data import prepare, read_index  # noqa: E402
from trunk.detokenize import StreamDecoder  # noqa: E402
from trunk.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer  # noqa: E402

TEXTS = ["Hello world! The café costs 5€ 🙂 today", "  leading spaces\n\nand newlines\ttabs",
         "日本語のテキスト ok", "über naïve résumé — “quotes” 👍🏽", "def f(x):\n    return x * 2"]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because."}, {"role": "user", "content": "Café 🙂?"}],
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def toks(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tok_{request.param}")
    save_tokenizer(request.param, d)
    return request.param, d, transformers.AutoTokenizer.from_pretrained(d), load_tokenizer(d)


def test_loads_as_hf_and_matches_transformers(toks):
    kind, d, ref, ours = toks
    assert isinstance(ours, HFTokenizer) and ours.kind == "hf"
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text                 # BOS from the post-processor (Llama), none (Qwen2)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.encode_batch(TEXTS) == [ref(t).input_ids for t in TEXTS]
    assert ours.bos_id == ref.bos_token_id and ours.eos_id == ref.eos_token_id


def test_eos_list_from_generation_config(toks):
    kind, d, ref, ours = toks
    want = json.loads((d / "generation_config.json").read_text())["eos_token_id"]
    assert list(ours.eos_ids) == want and len(want) == 2
    assert ours.eos_id == want[0]                             # eos_id stays the tokenizer's own EOS


def test_chat_template_matches_transformers(toks):
    kind, d, ref, ours = toks
    for chat in CHATS:
        want = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if not isinstance(want, list) else want
        assert ours.apply_chat_template(chat) == want
    if kind == "llama":  # the template's own raise_exception becomes one TokenizerError line
        with pytest.raises(TokenizerError, match="must start with a user"):
            ours.apply_chat_template([{"role": "assistant", "content": "x"}])


class _Counting:
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids):
        ids = list(ids)
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


@pytest.mark.parametrize("prompt", ["Hello there", "Q:", "x"])
def test_stream_decoder_equals_whole_decode(toks, prompt):
    kind, d, ref, ours = toks
    for text in TEXTS:
        p_ids = ours.encode(prompt)
        g_ids = ours.encode(text)[1 if kind == "llama" else 0:]  # generated text carries no BOS
        counting = _Counting(ours)
        s = StreamDecoder(counting, p_ids)
        deltas = [s.step(i) for i in g_ids]
        got = "".join(deltas) + s.flush()
        full, head = ours.decode(p_ids + g_ids), ours.decode(p_ids)
        assert full.startswith(head) and got == full[len(head):], (text, got)
        assert not any("\ufffd" in x for x in deltas)           # partial UTF-8 is held back, never sent
        # windows stay short: the left context plus the longest run of one character's byte tokens
        assert max(counting.lengths) <= 5 + 8, counting.lengths


def test_stream_decoder_leading_space_and_flush():
    tok = ByteTokenizer()
    s = StreamDecoder(tok, tok.encode("Hi"))
    assert s.step(ord(" ")) == " "                            # a leading space survives
    euro = "€".encode()
    assert [s.step(b) for b in euro[:2]] == ["", ""]         # incomplete: held back
    assert s.flush() == "\ufffd"                             # at the end it is shown as U+FFFD


def test_save_load_and_prepare_with_its_tokenizer(toks, tmp_path):
    kind, d, ref, ours = toks
    (tmp_path / "copy").mkdir()
    ours.save(tmp_path / "copy")
    for name in ours.files():
        assert (tmp_path / "copy" / name).read_bytes() == (d / name).read_bytes()
    again = load_tokenizer(tmp_path / "copy")
    assert again.encode(TEXTS[0]) == ours.encode(TEXTS[0]) and again.eos_ids == ours.eos_ids
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(TEXTS * 3):
        (src / f"{i}.txt").write_text(t)
    prepare([str(src)], tmp_path / "data", tokenizer=str(d), val_fraction=0.2, progress=False)
    index = read_index(tmp_path / "data")
    assert index["tokenizer"]["type"] == "hf" and index["vocab_size"] == ours.vocab_size
    assert load_tokenizer(tmp_path / "data").encode(TEXTS[1]) == ref(TEXTS[1]).input_ids


def test_bad_tokenizer_dirs(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no \"type\""):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="cannot load Hugging Face tokenizer"):
        load_tokenizer(tmp_path)
