"""Multi-process training on CPU (torchrun + gloo): DDP and FSDP2 resume exactly, 2-process FSDP matches
one process with the same global batch, sharded state resumes on another world size, activation
checkpointing and bf16 mixed precision under FSDP, the fused linear-CE against the sharded
unembedding, the sharded trainer-state layout, and the GPU benchmark's CPU smoke mode.

The 2-process runs go through the real CLI under torchrun. To pay for start-up only twice, one launch
runs the uninterrupted and interrupted runs back to back (tests/trunk/torchrun_runs.py) and a second,
fresh launch resumes them, so a resume never sees the memory of the run that saved it.
The model exercises every FSDP group: one branch layer and an adapter per shallow exit head, own
(untied) shallow-exit unembeddings and a tied final head, vocab 259 (odd: uneven shards).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trunk import parallel
from trunk.checkpoint import load_checkpoint
from trunk.cli import main
from trunk.config import get_preset
from trunk.data import prepare
from trunk.loss import family_loss
from trunk.model import FamilyModel
from trunk.train import FamilyLossModule

REPO = Path(__file__).resolve().parents[2]
MODEL = ("--preset", "tiny", "--model", "branch_layers=1", "--model", "adapter_rank=4",
         "--model", "exit_unembed=own")
# 8 steps of global batch 8 (2 micro-batches x 2 processes x 2, or 2 x 1 x 4 in one process)
SCHEDULE = ("--steps", "8", "--grad-accum", "2", "--save-every", "2", "--seq-len", "32", "--warmup-steps", "2",
            "--eval-every", "3", "--eval-batches", "2", "--log-every", "1", "--no-progress", "--threads", "1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(12):  # varied byte text so the loss moves
        (src / f"m{i}.py").write_text("".join(f"def g{i}_{j}(y):\n    return y - {j} * {i}\n" for j in range(40)))
    prepare([str(src)], root / "data", tokenizer="byte", val_fraction=0.2, progress=False)
    return root / "data"


def _argv(data, out, *extra, batch=2):
    return [*MODEL, "--data", str(data), "--out", str(out), *SCHEDULE, "--batch-size", str(batch), *extra]


NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _torchrun(runs: list[dict], tmp: Path, name: str, timeout=300) -> None:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "trunk" / "torchrun_runs.py"), str(spec)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))}


def _val(out):
    return json.loads((Path(out) / "runs.jsonl").read_text().splitlines()[-1])["exit_val_loss"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Output directories of: one process; 2-process ddp/fsdp full and interrupted-then-resumed runs;
    fsdp with activation checkpointing; fsdp with bf16 parameters."""
    tmp = tmp_path_factory.mktemp("par")
    d = {k: tmp / k for k in ("one", "ddp", "ddp_cut", "fsdp", "fsdp_cut", "fsdp_cut1", "fsdp_ac", "fsdp_bf16")}
    assert main(_argv(data_dir, d["one"], batch=4)) == 0
    cpu = ("--device", "cpu")
    first = [
        {"argv": _argv(data_dir, d["ddp"], *cpu, "--parallel", "ddp")},
        {"argv": _argv(data_dir, d["ddp_cut"], *cpu, "--parallel", "ddp", "--stop-at", "4")},
        {"argv": _argv(data_dir, d["fsdp"], *cpu, "--parallel", "fsdp")},
        {"argv": _argv(data_dir, d["fsdp_cut"], *cpu, "--parallel", "fsdp", "--stop-at", "4")},
        {"argv": _argv(data_dir, d["fsdp_cut1"], *cpu, "--parallel", "fsdp", "--stop-at", "4")},
        # the same schedule, compared over its first 4 steps
        {"argv": _argv(data_dir, d["fsdp_ac"], *cpu, "--parallel", "fsdp", "--activation-checkpointing",
                       "--stop-at", "4")},
        {"argv": _argv(data_dir, d["fsdp_bf16"], *cpu, "--parallel", "fsdp", "--dtype", "bfloat16", "--stop-at", "4")},
    ]
    _torchrun(first, tmp, "first")
    d["fsdp_cut_dcp"] = sorted(p.name for p in (d["fsdp_cut"] / "trainer_state.dcp").iterdir())
    resume = [{"argv": _argv(data_dir, d[k], *cpu, "--parallel", k.split("_")[0], "--resume", "auto")}
              for k in ("ddp_cut", "fsdp_cut")]
    _torchrun(resume, tmp, "resume")
    # the 2-process shards resumed by one process (fsdp over a group of one), same global batch
    p = subprocess.run([sys.executable, "-m", "trunk.cli",
                        *_argv(data_dir, d["fsdp_cut1"], *cpu, "--parallel", "fsdp", "--resume", "auto", batch=4)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return d


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_resume_is_exact(runs, kind):
    # the same CPU kernels on the same data from bit-identical restored state: equal to float printing
    full, cut = _losses(runs[kind]), _losses(runs[f"{kind}_cut"])
    assert sorted(cut) == sorted(full)
    for step in range(5, 9):
        assert cut[step] == pytest.approx(full[step], abs=1e-6), (kind, step)
    assert _val(runs[f"{kind}_cut"]) == pytest.approx(_val(runs[kind]), abs=1e-6)
    assert len((runs[f"{kind}_cut"] / "runs.jsonl").read_text().splitlines()) == 1  # only the finished run


@pytest.mark.slow
def test_sharded_state_resumes_on_another_world_size(runs):
    # DCP reshards on load: 2 processes' shards continue in 1 process (batch 4 instead of 2 x 2) as
    # the 2-process run did; tolerance as for 2 processes vs 1 below
    full, cut = _losses(runs["fsdp"]), _losses(runs["fsdp_cut1"])
    for step in range(5, 9):
        assert cut[step] == pytest.approx(full[step], abs=2e-5), step
    assert json.loads((runs["fsdp_cut1"] / "runs.jsonl").read_text())["world_size"] == 1


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(runs):
    # Tolerance 2e-5 (fp32, as for DDP in test_train): the 2-process run averages per-rank gradients
    # in a reduce-scatter and sums the clipping norm over shards, a different summation order than
    # one process's batch; AdamW's g / sqrt(v) can magnify rounding-level gradient differences in the
    # first steps. Observed differences are <= 1e-6.
    one, two = _losses(runs["one"]), _losses(runs["fsdp"])
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=2e-5), step
    assert two[8] < two[1] - 1.0  # and it learns
    assert _val(runs["fsdp"]) == pytest.approx(_val(runs["one"]), abs=2e-5)
    rec = json.loads((runs["fsdp"] / "runs.jsonl").read_text())
    assert rec["world_size"] == 2 and rec["global_batch"] == 8 and rec["config"]["train"]["parallel"] == "fsdp"


@pytest.mark.slow
def test_fsdp_family_checkpoint_is_the_full_model(runs):
    # rank 0 gathers the shards into the ordinary checkpoint: it loads and holds the same weights
    m1, _, meta1 = load_checkpoint(runs["one"])
    m2, _, meta2 = load_checkpoint(runs["fsdp"])
    assert meta2["step"] == 8 and meta2["dtype"] == "float32"
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    worst = max((sd1[k] - sd2[k]).abs().max().item() for k in sd1)
    assert worst < 1e-4, worst  # 8 AdamW steps of lr <= 3e-3 from identical init; see the tolerance above


@pytest.mark.slow
def test_sharded_trainer_state_layout(runs, data_dir, capsys):
    cut = runs["fsdp_cut"]
    state = torch.load(cut / "trainer_state.pt", weights_only=False)
    assert state["step"] == 8 and state["sharded"] == "trainer_state.dcp/step-00000008"
    assert "model" not in state and "optimizer" not in state  # they live in the shards
    folder = cut / state["sharded"]
    assert (folder / ".metadata").is_file() and len(list(folder.glob("*.distcp"))) == 2  # one file per rank
    assert runs["fsdp_cut_dcp"] == ["step-00000004"]  # step 2's folder was pruned when step 4 was saved
    assert [p.name for p in (cut / "trainer_state.dcp").iterdir()] == ["step-00000008"]
    # a sharded state cannot be resumed as a replica: one line, exit 2 (same global batch of 8)
    rc = main(_argv(data_dir, cut, "--resume", "auto", batch=4))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "saved under --parallel fsdp" in err, err


@pytest.mark.slow
def test_activation_checkpointing_changes_nothing_but_memory(runs):
    # recomputation replays the same fp32 ops: the same losses
    base, ac = _losses(runs["fsdp"]), _losses(runs["fsdp_ac"])
    assert sorted(ac) == [1, 2, 3, 4]
    for step in ac:
        assert ac[step] == pytest.approx(base[step], abs=1e-6), step


@pytest.mark.slow
def test_fsdp_bf16_parameters_fp32_master_weights(runs):
    # bf16 gathered parameters and compute, fp32 reduction and master weights: the loss follows the
    # fp32 run to bf16 accuracy (8-bit mantissa, ~4e-3 relative per rounding; observed <= 2e-3)
    base, bf = _losses(runs["fsdp"]), _losses(runs["fsdp_bf16"])
    assert sorted(bf) == [1, 2, 3, 4]
    for step in bf:
        assert bf[step] == pytest.approx(base[step], abs=1e-2), step
    assert any(bf[s] != base[s] for s in bf)  # it did compute in bf16
    _, _, meta = load_checkpoint(runs["fsdp_bf16"])
    shards = torch.load(runs["fsdp_bf16"] / "trainer_state.pt", weights_only=False)["sharded"]
    assert meta["dtype"] == "float32" and (runs["fsdp_bf16"] / shards / ".metadata").is_file()


def test_bad_parallel_settings_fail_with_one_line(data_dir, tmp_path, capsys):
    for extra, needle in ((("--parallel", "zero3"), "parallel must be one of ddp, fsdp"),
                          (("--parallel", "fsdp", "--compile"), "not supported with --parallel fsdp"),
                          (("--compile", "--activation-checkpointing"), "do not work together")):
        rc = main(_argv(data_dir, tmp_path / "x", *extra))
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not torch.distributed.is_initialized()  # refused before any process group started


@pytest.mark.slow
def test_fused_linear_ce_with_sharded_unembeddings(runs, data_dir, tmp_path):
    # FAMILIAL_KERNELS=triton sends family_loss to the fused multi-exit linear-CE (Triton's CPU
    # interpreter here), fed the root group's gathered unembeddings; it must train like the reference
    # path. Tolerance as for 2 processes vs 1: fp32 chunked GEMMs sum in another order (observed 5e-7).
    out = tmp_path / "fused"
    _torchrun([{"argv": _argv(data_dir, out, "--device", "cpu", "--parallel", "fsdp", "--stop-at", "2"),
                "env": {"FAMILIAL_KERNELS": "triton", "FAMILIAL_KERNELS_AUTOTUNE": "0"}}], tmp_path, "fused")
    base, fused = _losses(runs["fsdp"]), _losses(out)
    assert sorted(fused) == [1, 2]
    for step in fused:
        assert fused[step] == pytest.approx(base[step], abs=2e-5), step


def _tiny():
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(branch_layers=1, adapter_rank=4, exit_unembed="own")
    model = FamilyModel(cfg)
    tok = torch.randint(0, cfg.vocab_size, (2, 17))
    return model, tok[:, :-1], tok[:, 1:]


def test_family_loss_reaches_the_fused_kernel_under_the_switch(monkeypatch):
    model, x, y = _tiny()
    loss_ref, per_ref = family_loss(model, x, y)
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setenv("FAMILIAL_KERNELS", "triton")
    monkeypatch.setenv("FAMILIAL_KERNELS_AUTOTUNE", "0")
    loss, per = family_loss(model, x, y)
    assert "MultiExitLinearCE" in loss.grad_fn.name()  # the fused autograd Function, not F.linear
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref.item(), abs=1e-5)
    assert torch.allclose(per, per_ref, atol=1e-5)
    for n, p in model.named_parameters():  # fp32 chunked GEMMs vs one GEMM: rounding only
        assert torch.allclose(p.grad, grads_ref[n], atol=1e-6, rtol=1e-4), n


def _saved_bytes(net, x, y) -> int:
    """Bytes autograd keeps for the backward of one forward (what activation checkpointing cuts)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = net(x, y)
    return total, loss


def test_activation_checkpointing_keeps_block_inputs_only():
    model, x, y = _tiny()
    plain, loss = _saved_bytes(FamilyLossModule(model, None), x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    net = parallel.wrap(model, FamilyLossModule(model, None), parallel.ParallelConfig(activation_checkpointing=True),
                        torch.device("cpu"), world=1)
    ckpt, loss2 = _saved_bytes(net, x, y)
    loss2.backward()
    assert ckpt < plain / 2, (ckpt, plain)
    assert loss2.item() == loss.item()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n  # recomputation replays the same ops
    assert set(model.state_dict()) == set(FamilyModel(model.cfg).state_dict())  # names unchanged


def test_fsdp_groups_and_gathered_unembeddings():
    """One process group of one (gloo) is enough to see FSDP2's grouping and what the loss reads."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model, x, y = _tiny()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = parallel.wrap(model, FamilyLossModule(model, None), parallel.ParallelConfig(kind="fsdp"),
                            torch.device("cpu"), world=1)
        assert parallel.is_sharded(net) and all(isinstance(b, FSDPModule) for b in model.layers)
        for head in model.heads:  # one group per exit head: its branch block, norm and adapter
            mods = parallel.exit_head_modules(head)
            assert len(mods) == 3 and all(isinstance(m, FSDPModule) for m in mods)
            assert len({id(m._get_fsdp_state()) for m in mods}) == 1
        assert isinstance(model.embed.weight, DTensor) and isinstance(model.heads[0].unembed.weight, DTensor)
        seen = []

        def inside_root_forward(module, args):  # runs after FSDP's own pre-hook has gathered the root
            seen.extend(type(model.unembed_weight(g)) for g in range(model.cfg.G))

        net.register_forward_pre_hook(inside_root_forward)
        loss, _ = net(x, y)
        loss.backward()
        assert seen and not any(issubclass(t, DTensor) for t in seen)  # the loss gets plain gathered tensors
        assert isinstance(model.embed.weight, DTensor) and isinstance(model.embed.weight.grad, DTensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_tracks_ddp(data_dir, tmp_path):
    # NCCL, bf16 autocast; fsdp also gathers bf16 parameters (DDP keeps fp32 ones under autocast) and
    # reduces in fp32: the two follow each other to bf16 accuracy. Both use the fused linear-CE.
    out = {k: tmp_path / k for k in ("ddp", "fsdp")}
    _torchrun([{"argv": _argv(data_dir, out[k], "--device", "cuda", "--parallel", k)} for k in out], tmp_path, "gpu")
    a, b = _losses(out["ddp"]), _losses(out["fsdp"])
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-2), step
    assert load_checkpoint(out["fsdp"])[2]["step"] == 8


@pytest.mark.slow  # 13 s alone, up to ~55 s on a shared 2-core machine
def test_multigpu_benchmark_cpu_smoke(tmp_path):
    # the GPU benchmark's own path (driver -> torchrun -> trainer pieces -> JSON, plot, table) on gloo
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_multigpu.py"), "--cpu-smoke", "--out", str(tmp_path),
           "--cases", "1b-x2-fsdp", "--steps", "2", "--warmup", "1"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((tmp_path / "train_multigpu.json").read_text())
    assert {"device", "torch", "date"} <= set(doc) and doc["smoke"] is True
    (r,) = doc["results"]
    assert r["case"] == "1b-x2-fsdp" and r["gpus"] == 2 and r["parallel"] == "fsdp" and r["tokens_per_s"] > 0
    assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
    assert (tmp_path / "train_multigpu.png").is_file()
    assert p.stdout.splitlines()[-1].startswith("1b-x2-fsdp")  # the table comes last
