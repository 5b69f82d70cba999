"""The device tier on ONNX Runtime (real onnxruntime, no mocks) against PyTorch, with KV caches.

Tolerance: both sides run fp32 on CPU; the ONNX graph's explicit softmax attention and ORT's fused
kernels reorder sums relative to SDPA, which moves logits of magnitude ~10 by ~1e-6. 1e-4 absolute
leaves two orders of headroom while still catching any real mismatch (a wrong position, mask or KV
slot moves logits by >= 1e-2 here).
"""
import json

import pytest
import torch

from deploy.cli import main
from deploy.manifest import MANIFEST, ShardError
from deploy.onnx_export import OnnxTierStage, check_tier, export_tier
from deploy.shards import load_chain, load_tier, split_checkpoint, verify_dir
from trunk.kv_pool import KVPool
from trunk.stage import SeqRun, StageError

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(make_ckpt, tmp_path_factory):
    """variant -> (shard dir, full model), the device tier exported once per variant."""
    out = {}

    def get(variant, tiers="device=0,edge=1,cloud=2..", tier="device"):
        key = (variant, tiers, tier)
        if key not in out:
            ckpt, model = make_ckpt(variant)
            d = tmp_path_factory.mktemp(f"onnx-{variant}")
            split_checkpoint(ckpt, d, tiers)
            export_tier(d, tier)
            out[key] = (d, model)
        return out[key]

    return get


@pytest.mark.parametrize("variant", ["tied", "branch_own"])
def test_onnx_device_tier_matches_pytorch_over_prefill_and_decode(exported, variant):
    d, _ = exported(variant)
    rep = check_tier(d, "device", tol=TOL)
    s = rep["summary"]
    assert s["ok"] and s["argmax_equal"] and s["max_abs_diff"] <= TOL, s
    assert any(step["pos"] == 0 and step["T"] > 1 for step in rep["steps"])   # a prefill from an empty cache
    assert sum(step["T"] == 1 and step["pos"] > 0 for step in rep["steps"]) >= 6  # decode steps on the cache
    m = json.loads((d / MANIFEST).read_text())
    assert m["onnx"]["device"]["check"]["max_abs_diff"] == s["max_abs_diff"]
    assert m["onnx"]["device"]["inputs"][:2] == ["input_ids", "pos"]
    verify_dir(d)  # the manifest update kept every shard record


@pytest.mark.parametrize("variant", ["tied", "branch_own"])
def test_chain_with_onnx_device_equals_full_model(exported, run_chain, chunks, variant):
    d, model = exported(variant)
    stages = [OnnxTierStage(d, "device")] + load_chain(d)[1:]
    tokens = torch.randint(0, 259, (2, chunks[-1][1]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(tokens)
    got = run_chain(stages, tokens, chunks)
    for g in range(model.cfg.G):
        torch.testing.assert_close(got[g], want[g], rtol=0, atol=TOL)
        assert torch.equal(got[g].argmax(-1), want[g].argmax(-1))


def test_onnx_edge_tier_takes_hidden_states(exported):
    d, _ = exported("tied", tier="edge")
    s = check_tier(d, "edge", tol=TOL)["summary"]
    assert s["ok"], s
    assert OnnxTierStage(d, "edge").has_embedding is False


def test_onnx_stage_interface(exported):
    d, model = exported("tied")
    st, ref = OnnxTierStage(d, "device"), load_tier(d, "device")
    assert (st.start_layer, st.stop_layer, st.exits, st.deepest_exit, st.is_last) == \
        (ref.start_layer, ref.stop_layer, ref.exits, ref.deepest_exit, ref.is_last)
    pool = KVPool(st.pool_shape(8), 2, "cpu")
    assert pool.k.numel() == 0 and pool.logs.shape == (1, 2, 8, 64)   # KV lives in the graph's arrays
    tokens = torch.tensor([5, 6, 7])
    out = st.forward(tokens, [SeqRun(1, 0, 3, [0], want=0)], pool)
    assert out.seqs[0].exit == 0
    with torch.no_grad():
        assert out.seqs[0].token == int(model(tokens[None], exits=[0])[0][0, -1].argmax())
        h = model.layers[0](model.embed(tokens[None]), model.rope_cos[:3, None], model.rope_sin[:3, None],
                            __import__("trunk.model", fromlist=["causal_attend"]).causal_attend)
    torch.testing.assert_close(pool.logs[0, 1, :3], h[0], rtol=0, atol=TOL)   # the boundary log for the edge
    fwd = st.forward(torch.tensor([8]), [SeqRun(1, 3, 1, [3], want=2)], pool)  # deeper: not answered here
    assert fwd.seqs[0].exit is None and fwd.fallback_rows == [0]
    runs = [SeqRun(1, 4, 1, [4], want=2)]
    assert st.fallback_tokens(fwd, [0], runs)[0].exit == 0
    with pytest.raises(StageError):
        st.forward(torch.tensor([9]), [SeqRun(0, 5, 1, [5], want=0)], pool)  # a slot that holds nothing


def test_onnx_file_tamper_refused(exported, tmp_path):
    import shutil

    d0, _ = exported("tied")
    d = tmp_path / "copy"
    shutil.copytree(d0, d)
    path = d / "device.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"device\.onnx: sha256"):
        OnnxTierStage(d, "device")
    with pytest.raises(ShardError, match=r"device\.onnx: sha256"):
        verify_dir(d)
    with pytest.raises(ShardError, match="no ONNX export for tier 'edge'"):
        OnnxTierStage(d, "edge")


def test_cli_export_onnx_check(make_ckpt, tmp_path, capsys):
    ckpt, _ = make_ckpt("tied")
    d = tmp_path / "sh"
    assert main(["split", str(ckpt), "--out", str(d)]) == 0
    assert main(["export-onnx", str(d), "--tier", "device", "--check"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["max_abs_diff"] <= TOL
    assert main(["export-onnx", str(d), "--tier", "phone"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
