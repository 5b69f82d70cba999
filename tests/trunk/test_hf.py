"""Hugging Face interop: random small Llama / Qwen2 / Mistral models made here give our final-exit
logits; new exits start from the final head (branch layers from the following trunk layers); import-hf
and export-hf round trips through transformers; unsupported configs fail in one line naming the key."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.trunk.hf_models import random_model, write_model  # noqa: E402
from trunk.checkpoint import load_checkpoint  # noqa: E402
from trunk.cli import main  # noqa: E402
from trunk.hf import HFImportError, load_hf, save_hf  # noqa: E402

V = 301


def _tokens(T=37, B=2, seed=0, vocab=V):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True),
                                      ("mistral", False)])
def test_import_matches_transformers(tmp_path, kind, tie):
    hf = random_model(kind, V, tie=tie, **({"sliding_window": None} if kind == "mistral" else {}))
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, exit_layers=(1, 3)).eval()
    tokens = _tokens()
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert len(got) == 3
    # fp32 on both sides; remaining difference is summation order only.
    assert (got[-1] - ref).abs().max().item() <= 1e-4
    # new shallow exits start from the final head's norm and unembedding
    assert torch.equal(ours.heads[0].norm.weight, ours.norm.weight)


def test_sharded_checkpoint(tmp_path):
    hf = random_model("qwen2", V)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path, exit_layers=(2,))
    with torch.no_grad():
        assert (ours(_tokens())[-1] - hf(_tokens()).logits).abs().max().item() <= 1e-4


def test_new_branch_layers_copy_the_following_layers(tmp_path):
    """Exit at layer l with k branch layers copied from layers l..l+k-1 and the final norm/head is, before
    any adaptation, the pretrained model cut after layer l+k."""
    hf = random_model("llama", V, layers=5)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, exit_layers=(1, 3), branch_layers=2, exit_unembed="own").eval()
    tokens = _tokens(T=21)
    with torch.no_grad():
        hs = hf(tokens, output_hidden_states=True).hidden_states  # hs[i] = after i layers
        got = ours(tokens)
        for g, layer in enumerate((1, 3)):
            cut = hf.lm_head(hf.model.norm(hs[layer + 2])) if layer + 2 < 5 else hf(tokens).logits
            assert (got[g] - cut).abs().max().item() <= 1e-4, g


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_round_trip(tmp_path, kind):
    hf = random_model(kind, V)
    hf.save_pretrained(tmp_path / "in")
    ours = load_hf(tmp_path / "in", exit_layers=(2,))
    save_hf(ours, tmp_path / "out", arch=kind)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    back = cls.from_pretrained(tmp_path / "out").float().eval()
    tokens = _tokens(T=19, B=1)
    with torch.no_grad():
        assert (back(tokens).logits - hf(tokens).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind,flags", [("qwen2", ["--branch-layers", "1", "--exit-unembed", "own"]),
                                        ("llama", [])])
def test_cli_import_then_export_every_exit(tmp_path, kind, flags, capsys):
    write_model(kind, tmp_path / "hf", tie=kind == "llama")
    assert main(["import-hf", str(tmp_path / "hf"), "--exits", "1,2", *flags, "--out", str(tmp_path / "fam")]) == 0
    model, tok, meta = load_checkpoint(tmp_path / "fam")
    assert tok.kind == "hf" and meta["source"]["architecture"].lower().startswith(kind[:4])
    assert (tmp_path / "fam" / "chat_template.jinja").is_file() and (tmp_path / "fam" / "generation_config.json").is_file()
    # perturb the exit heads so each exported exit is its own model, then export
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    from trunk.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "fam2", model, tok)
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "fam2"), "--out", str(tmp_path / "exp")]) == 0
    printed = capsys.readouterr().out
    tokens = _tokens(T=15, vocab=model.cfg.vocab_size)
    with torch.no_grad():
        ours = model.eval()(tokens)
        for g, name in enumerate(["exit-0", "exit-1", "final"]):
            d = tmp_path / "exp" / name
            assert str(d) in printed
            back = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
            assert (back(tokens).logits - ours[g]).abs().max().item() <= 1e-4, name
            assert transformers.AutoTokenizer.from_pretrained(d)("Hello world").input_ids == tok.encode("Hello world")


def test_export_skips_adapter_exits(tmp_path, capsys):
    write_model("qwen2", tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--exits", "2", "--adapter-rank", "4",
                 "--out", str(tmp_path / "fam")]) == 0
    assert main(["export-hf", str(tmp_path / "fam"), "--out", str(tmp_path / "exp"), "--arch", "qwen2"]) == 0
    out = capsys.readouterr().out
    assert "exit 0: skipped (has an adapter)" in out and (tmp_path / "exp" / "final" / "config.json").is_file()
    assert main(["export-hf", str(tmp_path / "fam"), "--out", str(tmp_path / "e2"), "--arch", "llama"]) == 2
    assert "q/k/v biases" in capsys.readouterr().err


def _edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind,edit,key", [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None}, "rope_scaling.rope_type"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("mistral", {"sliding_window": 64}, "sliding_window"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures"),
])
def test_unsupported_configs_name_the_key(tmp_path, capsys, kind, edit, key):
    write_model(kind, tmp_path, **({"sliding_window": None} if kind == "mistral" else {}))
    _edit_config(tmp_path, **edit)
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path), "--exits", "2", "--out", str(tmp_path / "fam")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config.json: {key} = " in err, err
    assert not (tmp_path / "fam").exists()


def test_import_errors(tmp_path, capsys):
    with pytest.raises(HFImportError, match="config.json"):
        load_hf(tmp_path)
    hf = random_model("llama", V)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exit layers"):
        load_hf(tmp_path, exit_layers=(4,))
    # weights in the wrong shape for the config, and no tokenizer files
    assert main(["import-hf", str(tmp_path), "--exits", "2", "--out", str(tmp_path / "fam")]) == 2
    assert "tokenizer.json: not found" in capsys.readouterr().err
    _edit_config(tmp_path, intermediate_size=128)
    with pytest.raises(HFImportError, match="has shape"):
        load_hf(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(HFImportError, match="only safetensors"):
        load_hf(tmp_path)
