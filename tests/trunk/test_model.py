"""The model: exits, configs and checkpoints fail clearly (the stage loop over a KV pool: test_stage.py)."""
import pytest
import torch

from trunk import ConfigError, FamilyConfig, FamilyModel, get_preset
from trunk.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trunk.tokenizer import ByteTokenizer


def _model(**kw):
    torch.manual_seed(0)
    return FamilyModel(get_preset("tiny").replace(**kw)).eval()


def test_exit_subset_and_shapes():
    model = _model()
    x = torch.randint(0, 259, (3, 11))
    out = model(x, exits=[2, 0])
    assert [o.shape for o in out] == [(3, 11, 259)] * 2
    assert torch.allclose(out[1], model(x)[2])
    with pytest.raises(ValueError):
        model(x, exits=[3])


@pytest.mark.parametrize("bad,msg", [({"exit_layers": (4,)}, "exit layers"), ({"exit_layers": (2, 1)}, "increasing"),
                                     ({"n_kv_heads": 3}, "multiple"), ({"exit_unembed": "x"}, "exit_unembed")])
def test_bad_configs(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        get_preset("tiny").replace(**bad)


def test_config_round_trip_and_presets():
    cfg = FamilyConfig.from_dict({"preset": "family-4b"})
    assert cfg.exit_layers == (4, 16, 18) and cfg.G == 4
    assert FamilyConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown preset"):
        FamilyConfig.from_dict({"preset": "nope"})
    with pytest.raises(ConfigError, match="unknown model config field"):
        FamilyConfig.from_dict({"preset": "tiny", "depth": 3})


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = _model(branch_layers=1)
    save_checkpoint(tmp_path / "c", model, ByteTokenizer(), exit_val_loss=[3.0, 2.5, 2.0], dtype="float16")
    loaded, tok, meta = load_checkpoint(tmp_path / "c")
    assert [e["val_loss"] for e in meta["exits"]] == [3.0, 2.5, 2.0]
    x = torch.randint(0, 259, (1, 7))
    with torch.no_grad():
        ref = model.half().float()(x)[-1]
        assert (loaded(x)[-1] - ref).abs().max() < 1e-4
    # a checkpoint of another architecture
    other = FamilyModel(get_preset("tiny").replace(d_ff=128, branch_layers=1))
    save_checkpoint(tmp_path / "o", other, ByteTokenizer(), dtype="float16")
    (tmp_path / "o" / "family.json").write_text((tmp_path / "c" / "family.json").read_text())
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "o")
    # truncated weights
    w = tmp_path / "c" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "c")
    # foreign directory
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "family.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a familial checkpoint"):
        load_checkpoint(tmp_path / "f")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_meta_structure_matches_and_skips_initialisation():
    """On the meta device the model is a structure (deploy's shard layout, HF import): the same names and
    shapes as a real one, built without initialisers or RoPE arithmetic, whose meta kernels import
    torch._dynamo (measured: a relay node's shard load 1.2 s -> 0.04 s)."""
    import subprocess
    import sys
    cfg = get_preset("tiny").replace(branch_layers=1, adapter_rank=4, exit_unembed="own", tie_embeddings=False)
    with torch.device("meta"):
        meta = FamilyModel(cfg)
    real = FamilyModel(cfg)
    assert {n: t.shape for n, t in meta.state_dict().items()} == {n: t.shape for n, t in real.state_dict().items()}
    assert all(t.is_meta for t in meta.state_dict().values())
    code = ("import sys, torch; from trunk import FamilyModel, get_preset\n"
            "with torch.device('meta'): FamilyModel(get_preset('builtin'))\n"
            "assert 'torch._dynamo' not in sys.modules, 'building on meta imported torch._dynamo'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
