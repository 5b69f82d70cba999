"""Small Hugging Face models and tokenizers made inside the tests (no hub): a Llama-2-style SentencePiece
BPE with byte fallback and a Qwen2-style byte-level BPE, each with a chat template and an EOS list, and
random `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` models sized to them.

Imported as `tests.trunk.hf_models` (the repository root is on the path) by trunk and serving tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Hello world! How are you today? I am fine, thank you.",
    "Familial models exit early: device, edge and cloud share one trunk.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ( ) [ ] { } < > = + - * / %",
    "the and of to in is it you that he was for on are with as his they be at one have this from",
] * 4

LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                  "{% if loop.first and m['role'] == 'assistant' %}"
                  "{{ raise_exception('Conversation must start with a user or system message') }}{% endif %}"
                  "<|start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
# Qwen2's pre-tokenizer split (its tokenizer.json; transformers 5 also imposes it for model_type qwen2)
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
                 "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _trained_bpe(pre_tokenizer, vocab_size: int, specials: list[str], alphabet=()):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=list(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def llama_tokenizer():
    """Llama-2 layout: Prepend/Replace normalizer, BPE with <0xNN> byte fallback, Replace/ByteFallback/
    Fuse/Strip decoder, BOS added by the post-processor. Ids: <unk> 0, <s> 1, </s> 2, bytes 3..258."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    trained = json.loads(_trained_bpe(pre_tokenizers.Metaspace(prepend_scheme="always"), 420, []).to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|start|>", "<|eot_id|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def qwen_tokenizer():
    """Qwen2 layout: byte-level BPE, ChatML specials, no BOS."""
    from tokenizers import Regex, decoders, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _trained_bpe(pre, 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_tokenizer(kind: str, directory) -> "transformers.PreTrainedTokenizerFast":  # noqa: F821
    """Write tokenizer.json + tokenizer_config.json (+ chat template) + generation_config.json with
    the EOS list, as `save_pretrained` does for a real model; returns the transformers tokenizer."""
    import transformers

    d = Path(directory)
    if kind == "llama":
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer(), bos_token="<s>",
                                                  eos_token="</s>", unk_token="<unk>")
        hf.chat_template, eos = LLAMA_TEMPLATE, ["</s>", "<|eot_id|>"]
    else:
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=qwen_tokenizer(), eos_token="<|im_end|>",
                                                  pad_token="<|endoftext|>")
        hf.chat_template, eos = QWEN_TEMPLATE, ["<|im_end|>", "<|endoftext|>"]
    hf.save_pretrained(d)
    gen = {"eos_token_id": [hf.convert_tokens_to_ids(t) for t in eos]}
    if hf.bos_token_id is not None:
        gen["bos_token_id"] = hf.bos_token_id
    (d / "generation_config.json").write_text(json.dumps(gen))
    return hf


def random_model(kind: str, vocab_size: int, *, tie: bool = False, layers: int = 4, seed: int = 0, **extra):
    """A random fp32 causal LM of `kind` (llama | qwen2 | mistral) with non-zero q/k/v biases (Qwen2)."""
    import transformers

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=136, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
              tie_word_embeddings=tie, **extra)
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # HF zero-inits biases; make them matter
                p.normal_(0, 0.1)
            elif name.endswith("weight") and p.ndim == 2:
                # unit-scale embeddings and 0.1 matrices: greedy decoding of a random model then varies
                # its tokens instead of repeating one, and its argmaxes are not near-ties
                p.normal_(0, 1.0 if "embed_tokens" in name else 0.1)
    return model.float().eval()


def write_model(kind: str, directory, *, tie: bool = False, layers: int = 4, max_shard_size=None, seed: int = 0,
                **extra):
    """Tokenizer + random model of `kind` saved into `directory`; (transformers model, tokenizer)."""
    tok_kind = "llama" if kind in ("llama", "mistral") else "qwen2"
    hf_tok = save_tokenizer(tok_kind, directory)
    model = random_model(kind, len(hf_tok) + 3, tie=tie, layers=layers, seed=seed, **extra)  # padded vocab, as Qwen's
    model.generation_config.eos_token_id = json.loads((Path(directory) / "generation_config.json").read_text())["eos_token_id"]
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    return model, hf_tok
