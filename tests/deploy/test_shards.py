"""Split / verify / load round trips, refusal of tampered shards, and chained tiers == the full model."""
import json

import pytest
import torch

from deploy.manifest import MANIFEST, Manifest, ShardError, TierSpecError, parse_tier_spec, sha256_file
from deploy.shards import load_chain, load_tier, split_checkpoint, verify_dir


def test_split_writes_manifest_and_verifies(make_ckpt, tmp_path):
    ckpt, model = make_ckpt("tied")
    m = split_checkpoint(ckpt, tmp_path / "sh", "device=0,edge=1,cloud=2..")
    doc = json.loads((tmp_path / "sh" / MANIFEST).read_text())
    assert verify_dir(tmp_path / "sh") == m and m.to_dict() == doc and Manifest.from_dict(doc) == m
    assert m.source.files["model.safetensors"].sha256 == sha256_file(ckpt / "model.safetensors")
    assert [s.layers for s in m.shards] == [(0, 1), (1, 2), (2, 4)]
    assert [s.tier for s in m.shards] == ["device", "edge", "cloud"]
    # tied heads: shard 0 reads its own embedding, shard 1 carries a copy, the last an lm_head copy
    assert [s.unembed for s in m.shards] == [{0: "embed.weight"}, {1: "heads.1.unembed.weight"}, {2: "lm_head.weight"}]
    assert [s["unembed"] for s in doc["shards"]] == [{"0": "embed.weight"}, {"1": "heads.1.unembed.weight"},
                                                     {"2": "lm_head.weight"}]   # JSON object keys are strings
    assert "embed.weight" not in m.shards[1].tensors and "layers.1.mlp.up_proj.weight" in m.shards[1].tensors
    edge = load_tier(tmp_path / "sh", "edge")
    assert (edge.start_layer, edge.stop_layer, edge.exits, edge.deepest_exit) == (1, 2, [1], 1)
    assert not edge.has_embedding and not edge.is_last and edge.val_loss == {1: 2.5}
    assert edge.tokenizer.vocab_size == 259
    assert edge.model.embed is None  # the edge shard holds no embedding


def test_tier_names_are_data(make_ckpt, tmp_path):
    """Any tier names and any number of tiers: the manifest records them, and each loads by its name."""
    ckpt, _ = make_ckpt("tied")
    m = split_checkpoint(ckpt, tmp_path / "sh", "phone=0,hub=1,dc=2")
    assert [t.name for t in m.tiers] == ["phone", "hub", "dc"] and [s.tier for s in m.shards] == ["phone", "hub", "dc"]
    assert [st.tier for st in load_chain(tmp_path / "sh")] == ["phone", "hub", "dc"]
    assert [s.index for s in m.tier_shards("hub")] == [1]


def test_stage_holds_only_its_shard(make_ckpt, tmp_path):
    ckpt, model = make_ckpt("tied")
    m = split_checkpoint(ckpt, tmp_path / "sh")
    for stage in load_chain(tmp_path / "sh"):
        shard_bytes = sum(m.shards[k].bytes for k in stage.shards)
        assert 0.95 * shard_bytes < stage.nbytes() <= shard_bytes
        names = set(stage.model.state_dict())
        assert all(int(n.split(".")[1]) in range(stage.start_layer, stage.stop_layer)
                   for n in names if n.startswith("layers."))


@pytest.mark.parametrize("variant", ["tied", "branch", "own", "untied_adapter_branch"])
@pytest.mark.parametrize("tiers", ["device=0,edge=1,cloud=2..", "device=0-1,cloud=2", "all=0.."])
def test_chained_tiers_equal_full_model(make_ckpt, tmp_path, run_chain, chunks, variant, tiers):
    ckpt, model = make_ckpt(variant)
    split_checkpoint(ckpt, tmp_path / "sh", tiers)
    stages = load_chain(tmp_path / "sh")
    tokens = torch.randint(0, 259, (2, chunks[-1][1]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens)
    got = run_chain(stages, tokens, chunks)
    assert sorted(got) == list(range(model.cfg.G))
    for g in range(model.cfg.G):
        torch.testing.assert_close(got[g], want[g], rtol=0, atol=1e-5)


def test_tampered_shard_is_refused_naming_the_file(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt("tied")
    split_checkpoint(ckpt, tmp_path / "sh")
    path = tmp_path / "sh" / "shard-1.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-1\.safetensors: sha256"):
        load_tier(tmp_path / "sh", "edge")
    with pytest.raises(ShardError, match=r"shard-1\.safetensors"):
        verify_dir(tmp_path / "sh")
    load_tier(tmp_path / "sh", "device")  # other tiers' shards are still fine


def _rewrite_shard(directory, k, change):
    """Rewrite shard k with `change(tensors)` applied and the manifest's hash/size made to match."""
    from safetensors.torch import load_file, save_file

    path = directory / f"shard-{k}.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    m = json.loads((directory / MANIFEST).read_text())
    m["shards"][k].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (directory / MANIFEST).write_text(json.dumps(m))
    return m


def test_wrong_shape_is_refused(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt("tied")
    d = tmp_path / "sh"
    split_checkpoint(ckpt, d)
    name = "layers.2.mlp.up_proj.weight"
    _rewrite_shard(d, 2, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(ShardError, match=rf"shard-2\.safetensors: tensor {name} has shape"):
        load_tier(d, "cloud")


def test_manifest_shapes_that_disagree_with_architecture_are_refused(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt("tied")
    d = tmp_path / "sh"
    split_checkpoint(ckpt, d)
    m = json.loads((d / MANIFEST).read_text())
    m["shards"][0]["tensors"]["embed.weight"] = [10, 64]
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"shard-0\.safetensors: manifest lists tensor embed.weight"):
        load_tier(d, "device")


def test_missing_or_extra_tensor_and_bad_manifest(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt("tied")
    d = tmp_path / "sh"
    split_checkpoint(ckpt, d)
    _rewrite_shard(d, 1, lambda t: t.update({"stowaway": torch.zeros(2)}))
    with pytest.raises(ShardError, match=r"shard-1\.safetensors: tensor stowaway is not expected"):
        load_tier(d, "edge")
    m = json.loads((d / MANIFEST).read_text())
    m["shards"][1]["layers"] = [1, 3]
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"manifest\.json: shard 1: layers"):
        load_tier(d, "device")
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest\.json: not valid JSON"):
        verify_dir(d)
    split_checkpoint(ckpt, d)
    with pytest.raises(ShardError, match="no tier 'phone'"):
        load_tier(d, "phone")


def test_tokenizer_file_tamper_is_refused(make_ckpt, tmp_path):
    ckpt, _ = make_ckpt("tied")
    d = tmp_path / "sh"
    split_checkpoint(ckpt, d)
    (d / "tokenizer_config.json").write_text('{"type": "byte", "vocab_size": 258}\n')
    with pytest.raises(ShardError, match=r"tokenizer_config\.json"):
        load_tier(d, "device")


@pytest.mark.parametrize("spec, want", [
    ("device=0,edge=1,cloud=2..", [("device", [0]), ("edge", [1]), ("cloud", [2, 3, 4])]),
    ("device=0-1,cloud=2..4", [("device", [0, 1]), ("cloud", [2, 3, 4])]),
    ("x=0..", [("x", [0, 1, 2, 3, 4])]),
])
def test_parse_tier_spec(spec, want):
    assert parse_tier_spec(spec, 5) == want


@pytest.mark.parametrize("spec", ["device=0,cloud=2..", "cloud=1..,device=0", "a=0,a=1..", "device", "d=0-",
                                  "d=0..9", "1x=0..", "d=0,e=1"])
def test_parse_tier_spec_rejects(spec):
    with pytest.raises(TierSpecError):
        parse_tier_spec(spec, 5)


def test_float16_shards_load_and_upcast(make_ckpt, tmp_path, run_chain, chunks):
    ckpt, model = make_ckpt("branch_own")
    m = split_checkpoint(ckpt, tmp_path / "sh", dtype="float16")
    assert m.dtype == "float16" and verify_dir(tmp_path / "sh")
    assert load_tier(tmp_path / "sh", "edge").dtype == torch.float16
    # upcast on load: equals the full model with its weights rounded to fp16
    stages = load_chain(tmp_path / "sh", dtype=torch.float32)
    rounded = type(model)(model.cfg).eval()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    tokens = torch.randint(0, 259, (1, chunks[-1][1]), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = rounded(tokens)
    got = run_chain(stages, tokens, chunks)
    for g in range(model.cfg.G):
        torch.testing.assert_close(got[g], want[g], rtol=0, atol=1e-5)
