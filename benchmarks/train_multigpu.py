"""Multi-GPU training throughput: DDP and FSDP2 scaling of the 1b preset; a 12B-class family, sharded.

Cases (each a torchrun launch of this file with --worker; every process, torchrun's children included,
runs with NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1: NVLink
multicast stays off on the lent machines):
  1b  x1 GPU            one process, the reference for scaling efficiency
  1b  x2 GPUs  ddp      same per-GPU batch (weak scaling): efficiency = tok/s(2) / (2 tok/s(1))
  1b  x2 GPUs  fsdp     the same with FSDP2 (bf16 params, fp32 reduce)
  12b x2 GPUs  fsdp     a ~11.5B-parameter family (G=4) at seq 1024 with activation checkpointing
  12b x1 GPU   plain    the same model unsharded on one GPU: fp32 weights + grads + AdamW state need
                        16 bytes/param (~184 GB > 141 GB), so it must run out of memory; recorded.
Every step is the trainer's own `trunk.train.train_step` (LR schedule, bf16 autocast, fused multi-exit
linear-CE on CUDA, gradient clipping, fused AdamW) over the trainer's parallel wrapping
(`trunk.parallel.wrap`) on random tokens, so data loading is not measured. MFU uses trunk.flops'
model FLOPs per token (activation recomputation not counted) against the H200's 989 TFLOP/s dense
bf16 datasheet peak per GPU, and also against the measured 690-790 TFLOP/s bf16 matmul (DESIGN.md).

    python3 benchmarks/train_multigpu.py --out "$OUT"            # 2 GPUs, < 8 minutes
    python3 benchmarks/train_multigpu.py --out /tmp/o --cpu-smoke  # gloo, tiny shapes, a check of the script

Writes <out>/train_multigpu.json (+ .png, + one log per case) and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)  # before torch loads NCCL; children inherit it

PEAK_BF16 = 989e12           # H200 SXM dense bf16 per GPU (datasheet; same chip as the H100)
MEASURED_MATMUL = 740e12     # bf16 matmul measured on the lent H200, middle of 690-790 (DESIGN.md)


def model_config(name: str, smoke: bool):
    from trunk.config import FamilyConfig, get_preset

    if smoke:  # CPU: small shapes with the same structure
        return get_preset("tiny") if name == "1b" else get_preset("tiny").replace(d_model=96, n_layers=6,
                                                                                  exit_layers=(2, 4))
    if name == "1b":
        return get_preset("1b")  # TinyLlama-1.1B shape, exits (6, 11, 16)
    # 12B class: Llama-2-13B width and depth with GQA (8 kv heads), short context; exits at 1/4, 1/2, 3/4
    return FamilyConfig(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=8, d_ff=13824,
                        max_seq_len=1024, exit_layers=(10, 20, 30))


class RandomTokens:
    """Stands in for trunk.data.TokenData in train_step: batch `cursor` is seeded by its position."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def train_batch(self, cursor: int, batch: int, seed: int):
        import numpy as np

        rng = np.random.default_rng(cursor * 7919 + seed)
        return rng.integers(0, self.vocab, (batch, self.seq_len + 1), dtype=np.int64)


# ---- worker (one process per GPU under torchrun) -----------------------------------------------

def _worker(args) -> None:
    import torch

    from trunk.flops import flops_per_token, param_counts
    from trunk.train import TrainConfig, TrainPlan, autocast_dtype, setup

    smoke = args.cpu_smoke
    t = TrainConfig(parallel=args.parallel, device="cpu" if smoke else "cuda", batch_size=args.batch,
                    seq_len=args.seq_len, lr=1e-4, min_lr=1e-5, warmup_steps=2, grad_clip=1.0,
                    activation_checkpointing=args.ac, threads=1 if smoke else 0)
    d = setup(t)
    cfg = model_config(args.model, smoke)
    amp = autocast_dtype(t, d.device)
    if not smoke:
        torch.backends.cuda.matmul.allow_tf32 = True
    total = args.warmup + args.steps
    gb = args.batch * d.world
    fpt = flops_per_token(cfg, args.seq_len)
    plan = TrainPlan(steps=total, global_batch=gb, tokens=total * gb * args.seq_len, flops_per_token=fpt)
    res = {"case": args.case, "model": args.model, "parallel": args.parallel, "gpus": d.world,
           "batch_per_gpu": args.batch, "seq_len": args.seq_len, "G": cfg.G, "exit_layers": list(cfg.exit_layers),
           "params": param_counts(cfg).total, "activation_checkpointing": args.ac, "flops_per_token": fpt}
    try:
        _bench(res, cfg, t, d, amp, plan, args, total)
    except torch.cuda.OutOfMemoryError as e:  # (torch.OutOfMemoryError in newer torch; this name is in both)
        res.update(error="out of memory", phase=res.get("phase"), message=str(e).splitlines()[0][:300])
    if d.device.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res["gpu_mem_gb"] = torch.cuda.get_device_properties(d.device).total_memory / 1e9
    if d.main:
        Path(args.result).write_text(json.dumps(res))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _bench(res, cfg, t, d, amp, plan, args, total) -> None:
    import torch

    from trunk import parallel
    from trunk.model import FamilyModel
    from trunk.train import FamilyLossModule, make_optimizer, train_step

    res["phase"] = "init"
    torch.manual_seed(0)
    with torch.device(d.device):  # initialise on the GPU: a 12B CPU init would take minutes
        model = FamilyModel(cfg)
    pcfg = parallel.ParallelConfig(args.parallel, args.ac, param_dtype=amp if args.parallel == "fsdp" else None)
    net = parallel.wrap(model, FamilyLossModule(model, None), pcfg, d.device, d.world)
    opt = make_optimizer(model, t)
    data = RandomTokens(cfg.vocab_size, args.seq_len)
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    losses = []
    t0 = time.perf_counter()
    for step in range(total):
        if step == args.warmup:
            sync()
            res["warmup_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        res["phase"] = f"step {step}"
        losses.append(float(train_step(step, net, opt, data, t, plan, d, amp)))  # float(): synchronised
    sec = (time.perf_counter() - t0) / args.steps
    tok_s = plan.global_batch * args.seq_len / sec
    res.update(phase="done", step_s=sec, tokens_per_s=tok_s, tokens_per_s_per_gpu=tok_s / d.world,
               tflops_per_gpu=plan.flops_per_token * tok_s / d.world / 1e12,
               mfu=plan.flops_per_token * tok_s / d.world / PEAK_BF16,
               frac_of_measured_matmul=plan.flops_per_token * tok_s / d.world / MEASURED_MATMUL,
               losses=losses)


# ---- driver ------------------------------------------------------------------------------------

def cases(smoke: bool) -> list[dict]:
    b1, s1 = (2, 32) if smoke else (8, 2048)
    b12, s12 = (2, 32) if smoke else (4, 1024)
    return [
        dict(case="1b-x1", model="1b", gpus=1, parallel="ddp", batch=b1, seq_len=s1, ac=False),
        dict(case="1b-x2-ddp", model="1b", gpus=2, parallel="ddp", batch=b1, seq_len=s1, ac=False),
        dict(case="1b-x2-fsdp", model="1b", gpus=2, parallel="fsdp", batch=b1, seq_len=s1, ac=False),
        dict(case="12b-x2-fsdp", model="12b", gpus=2, parallel="fsdp", batch=b12, seq_len=s12, ac=True),
        dict(case="12b-x1-plain", model="12b", gpus=1, parallel="ddp", batch=1, seq_len=s12, ac=True,
             expect_oom=not smoke),  # on CPU the small stand-in fits: the smoke only runs the path
    ]


def launch(c: dict, args, out: Path, deadline: float) -> dict:
    result = out / f"_{c['case']}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(c["gpus"]),
           str(Path(__file__).resolve()), "--worker", "--case", c["case"], "--model", c["model"],
           "--parallel", c["parallel"], "--batch", str(c["batch"]), "--seq-len", str(c["seq_len"]),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", str(result)]
    cmd += ["--ac"] * c["ac"] + ["--cpu-smoke"] * args.cpu_smoke
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1" if args.cpu_smoke else "8"}
    if c.get("expect_oom"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    timeout = max(30.0, min(args.case_timeout, deadline - time.time()))
    t0 = time.time()
    with open(out / f"{c['case']}.log", "w") as log:
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = json.loads(result.read_text()) if result.is_file() else {"case": c["case"], "error": f"exit {rc}"}
    result.unlink(missing_ok=True)
    res.update(wall_s=round(time.time() - t0, 1), expect_oom=bool(c.get("expect_oom")))
    return res


def summarise(results: list[dict]) -> dict:
    by = {r["case"]: r for r in results}
    one = by.get("1b-x1", {}).get("tokens_per_s")
    eff = {}
    for k in ("1b-x2-ddp", "1b-x2-fsdp"):
        two = by.get(k, {}).get("tokens_per_s")
        if one and two:
            eff[k] = two / (2 * one)
    big = by.get("12b-x2-fsdp", {})
    params = big.get("params")
    # ddp and fsdp see the same random batches from the same init: their losses must agree to bf16
    la, lb = by.get("1b-x2-ddp", {}).get("losses"), by.get("1b-x2-fsdp", {}).get("losses")
    return {"scaling_efficiency_1_to_2_gpus": eff,
            "1b_max_loss_diff_ddp_vs_fsdp": max(abs(x - y) for x, y in zip(la, lb)) if la and lb else None,
            "12b_bytes_per_gpu_unsharded_adamw_gb": params * 16 / 1e9 if params else None,
            "12b_unsharded_oom_on_one_gpu": by.get("12b-x1-plain", {}).get("error") == "out of memory"}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "tokens_per_s" in r]
    if not ok:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [r["case"] for r in ok]
    a1.bar(labels, [r["tokens_per_s"] / 1e3 for r in ok], color="tab:blue")
    a1.set_ylabel("tokens/s (thousands, all GPUs)")
    a2.bar(labels, [100 * r["mfu"] for r in ok], color="tab:green")
    a2.axhline(100 * MEASURED_MATMUL / PEAK_BF16, color="gray", ls="--", lw=1, label="measured bf16 matmul")
    a2.set_ylabel("MFU per GPU vs 989 TFLOP/s (%)")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict], summary: dict) -> str:
    rows = [f"{'case':<14} {'params':>7} {'B x T':>9} {'step s':>7} {'tok/s':>9} {'MFU':>6} {'peak GB':>8}  note"]
    for r in results:
        note = r.get("error", "")
        if r.get("expect_oom"):
            note = ("OOM as expected: " if note == "out of memory" else "expected OOM, got: ") + (
                r.get("phase") or note or "no error")
        rows.append(f"{r['case']:<14} {r.get('params', 0) / 1e9:>6.2f}B {r.get('batch_per_gpu', 0):>3}x"
                    f"{r.get('seq_len', 0):<5} {r.get('step_s', float('nan')):>7.3f} {r.get('tokens_per_s', 0):>9.0f} "
                    f"{100 * r.get('mfu', 0):>5.1f}% {r.get('peak_mem_gb', float('nan')):>8.1f}  {note}")
    for k, v in summary["scaling_efficiency_1_to_2_gpus"].items():
        rows.append(f"scaling efficiency 1 -> 2 GPUs, {k}: {100 * v:.1f} %")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="directory for train_multigpu.json / .png / logs")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton autotuning, allocator)")
    ap.add_argument("--cases", default="", help="comma-separated subset of the case names (default: all)")
    ap.add_argument("--case-timeout", type=float, default=170, help="seconds one case may take")
    ap.add_argument("--time-limit", type=float, default=450, help="seconds for everything; later cases are skipped")
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU with tiny shapes: checks the script, measures nothing")
    # worker-only flags (this file under torchrun)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag, typ in (("--case", str), ("--model", str), ("--parallel", str), ("--batch", int), ("--seq-len", int),
                      ("--result", str)):
        ap.add_argument(flag, type=typ, help=argparse.SUPPRESS)
    ap.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return 0
    return drive(args)


def drive(args) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = cases(args.cpu_smoke)
    if args.cases:
        want = set(args.cases.split(","))
        todo = [c for c in todo if c["case"] in want]
    if not args.cpu_smoke:
        have = torch.cuda.device_count()
        if have < 2:
            print(f"train_multigpu: error: needs 2 CUDA GPUs, found {have} (use --cpu-smoke on CPU)", file=sys.stderr)
            return 2
    deadline = time.time() + args.time_limit
    results = []
    for c in todo:
        if time.time() > deadline - 30:
            results.append({"case": c["case"], "error": "skipped: time limit"})
            continue
        results.append(launch(c, args, out, deadline))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}), flush=True)
    device = "cpu (gloo smoke)" if args.cpu_smoke else f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    summary = summarise(results)
    doc = {"benchmark": "train_multigpu", "device": device, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "peak_bf16_per_gpu": PEAK_BF16,
           "measured_matmul_per_gpu": MEASURED_MATMUL, "steps": args.steps, "warmup": args.warmup,
           "smoke": args.cpu_smoke, "summary": summary, "results": results}
    (out / "train_multigpu.json").write_text(json.dumps(doc, indent=1))
    plot(results, out / "train_multigpu.png", f"familial training, {device}, torch {torch.__version__}")
    print(table(results, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
