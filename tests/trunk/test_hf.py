"""Hugging Face interop: random small Llama / Qwen2 models made here give our final-exit logits."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from trunk.hf import HFImportError, load_hf, save_hf  # noqa: E402


def _small(kind: str, tie: bool):
    kw = dict(vocab_size=301, hidden_size=64, intermediate_size=136, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**kw)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**kw)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF zero-inits biases; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.float().eval()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
def test_import_matches_transformers(tmp_path, kind, tie):
    hf = _small(kind, tie)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, exit_layers=(1, 3)).eval()
    tokens = torch.randint(0, 301, (2, 37))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert len(got) == 3
    # fp32 on both sides; remaining difference is summation order only.
    assert (got[-1] - ref).abs().max().item() <= 1e-4
    # new shallow exits start from the final head's norm and unembedding
    assert torch.equal(ours.heads[0].norm.weight, ours.norm.weight)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_round_trip(tmp_path, kind):
    hf = _small(kind, tie=False)
    hf.save_pretrained(tmp_path / "in")
    ours = load_hf(tmp_path / "in", exit_layers=(2,))
    save_hf(ours, tmp_path / "out", arch=kind)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    back = cls.from_pretrained(tmp_path / "out").float().eval()
    tokens = torch.randint(0, 301, (1, 19))
    with torch.no_grad():
        assert (back(tokens).logits - hf(tokens).logits).abs().max().item() <= 1e-5


def test_import_errors(tmp_path):
    with pytest.raises(HFImportError, match="config.json"):
        load_hf(tmp_path)
    hf = _small("llama", tie=False)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exit layers"):
        load_hf(tmp_path, exit_layers=(4,))
