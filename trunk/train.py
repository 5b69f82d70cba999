"""The family trainer: AdamW + warmup/cosine on the weighted mean of exit cross-entropies.

One process or many (`torchrun`: gloo on CPU, nccl on CUDA), as DDP replicas or FSDP2 shards
(`--parallel`, trunk/parallel.py). The global batch is
batch_size * grad_accum * world_size sequences of seq_len tokens; step s consumes global samples
[s*GB, (s+1)*GB) of the data sampler (`trunk/data.py`), rank r taking micro-batch m's slice
[(m*world + r)*B, (m*world + r + 1)*B). So a 2-process run sees exactly the batches of a 1-process
run with twice the batch size, and the whole data position is the step number.

Outputs under `out`:
    model.safetensors + family.json + tokenizer files   the checkpoint (trunk/checkpoint.py)
    trainer_state.pt    fp32 weights, optimizer, step, RNG states, data cursor: exact resume
                        (under fsdp the weights and optimizer are sharded: trunk/dist_checkpoint.py)
    metrics.jsonl       one line per logged step / evaluation
    runs.jsonl          one run record per finished run (schema: docs/run-record.md)
Checkpoint and trainer state are each written atomically; family.json and trainer_state.pt carry the
step, and resume refuses a pair that disagrees. The CLI (argparse, config files) lives in
`trunk/cli.py`; this file takes dataclasses. Exit adaptation (`init`, `train="exits"`, `distill`:
start from a checkpoint, freeze the trunk) is `trunk/adapt.py`, called from `train`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trunk import adapt, dist_checkpoint, parallel
from trunk.checkpoint import read_meta, save_checkpoint
from trunk.config import FamilyConfig
from trunk.data import TokenData
from trunk.flops import flops_per_token, param_counts, tokens_for_budget
from trunk.loss import exit_weights, family_loss
from trunk.model import FamilyModel
from trunk.trainer_state import read_trainer_state, rng_state, set_rng_state, write_trainer_state

RUN_SCHEMA = "familial.run/v1"
STATE_FILE = "trainer_state.pt"


class TrainError(ValueError):
    """A training setup that cannot run; one line naming the field or file."""


def _opt(default, help: str):
    """A TrainConfig field; `help` is its comment and its CLI help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = _opt("", "data directory written by `familial-train prepare`")
    out: str = _opt("runs/out", "output directory: checkpoint, trainer state, metrics, run record")
    steps: int = _opt(0, "optimizer steps; set exactly one of steps / tokens / flops")
    tokens: int = _opt(0, "training-token budget D; steps = ceil(D / (global batch * seq_len))")
    flops: float = _opt(0.0, "compute budget C in FLOPs; D = C / flops_per_token (trunk.flops)")
    seq_len: int = _opt(256, "tokens per training sequence (<= the model's max_seq_len)")
    batch_size: int = _opt(8, "sequences per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = _opt(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(50, "linear warmup steps from 0 to lr (at most half of the run's steps)")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices (not on norms, biases)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    eval_every: int = _opt(100, "evaluate per-exit validation loss every this many steps (0 = only at the end)")
    eval_batches: int = _opt(8, "validation micro-batches per process per evaluation (fixed set of eval_batches*batch_size*world sequences)")
    log_every: int = _opt(10, "write a metrics line every this many steps")
    exit_weights: list = _opt([], "per-exit loss weights shallow->deep, normalised (empty = 1/G each)")
    seed: int = _opt(0, "seed for initialisation and data order")
    device: str = _opt("auto", "auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    dtype: str = _opt("auto", "autocast dtype: auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float32")
    save_every: int = _opt(0, "save checkpoint + trainer state every this many steps (0 = only at the end)")
    save_dtype: str = _opt("float32", "dtype of model.safetensors: float32 | float16 | bfloat16")
    resume: str = _opt("", "resume from this output directory's trainer state ('auto' = out, if present)")
    stop_at: int = _opt(0, "stop (after saving) at this step, as if interrupted; 0 = run to the end")
    run_record: str = _opt("", "JSONL file the run record is appended to (default: <out>/runs.jsonl)")
    threads: int = _opt(0, "torch CPU threads (0 = torch's default)")
    compile: bool = _opt(False, "torch.compile the model")
    compile_blocks: bool = _opt(False, "torch.compile each decoder block (regional: the fused exit loss stays eager; "
                                       "combines with cuda_graph; one process)")
    cuda_graph: bool = _opt(False, "capture the whole optimizer step (forward, backward, clipping, AdamW) in one CUDA "
                                   "graph and replay it: for small models, whose eager steps are launch-bound "
                                   "(CUDA, one process, grad_accum 1, no compile)")
    parallel: str = _opt("ddp", "ddp | fsdp: under torchrun, replicate the model (DDP) or shard parameters, "
                                "gradients and optimizer state over the processes (FSDP2, bf16 compute on CUDA)")
    activation_checkpointing: bool = _opt(False, "recompute each decoder block's activations in the backward "
                                                 "(less memory for about 1/3 more compute)")
    progress: bool = _opt(True, "show a tqdm progress bar")
    # exit adaptation of a given trunk (trunk/adapt.py)
    init: str = _opt("", "start from this family checkpoint's architecture and weights (e.g. one made by import-hf)")
    train: str = _opt("all", "what learns: all | exits (freeze the trunk; only the shallow exit heads train)")
    distill: float = _opt(0.0, "with train=exits: weight a in (0, 1] of the KL to the final exit (0 = plain CE)")
    distill_temp: float = _opt(1.0, "distillation temperature T")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown train config field(s): {', '.join(unknown)}")
        return cls(**d)


# ---- planning ----------------------------------------------------------------------------------

@dataclass
class TrainPlan:
    steps: int
    global_batch: int  # sequences per optimizer step
    tokens: int        # D actually trained = steps * global_batch * seq_len
    flops_per_token: float


def make_plan(mcfg: FamilyConfig, t: TrainConfig, world: int) -> TrainPlan:
    for name in ("seq_len", "batch_size", "grad_accum"):
        if getattr(t, name) <= 0:
            raise TrainError(f"{name} must be positive, got {getattr(t, name)}")
    if t.seq_len > mcfg.max_seq_len:
        raise TrainError(f"seq_len {t.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if t.exit_weights:
        try:
            exit_weights(mcfg.G, t.exit_weights)
        except ValueError as e:
            raise TrainError(str(e)) from None
    gb = t.batch_size * t.grad_accum * world
    per_step = gb * t.seq_len
    fpt = flops_per_token(mcfg, t.seq_len)
    given = [n for n in ("steps", "tokens", "flops") if getattr(t, n)]
    if len(given) != 1:
        raise TrainError(f"set exactly one of steps / tokens / flops (got {', '.join(given) or 'none'})")
    if t.steps:
        steps = t.steps
    else:
        D = t.tokens if t.tokens else tokens_for_budget(mcfg, t.flops, t.seq_len)
        if D < per_step:
            raise TrainError(f"budget of {D:.4g} tokens is too small for one step of {per_step} tokens "
                             f"(global batch {gb} x seq_len {t.seq_len})")
        steps = math.ceil(D / per_step)
    if steps <= 0:
        raise TrainError(f"steps must be positive, got {steps}")
    return TrainPlan(steps, gb, steps * per_step, fpt)


def lr_at(step: int, t: TrainConfig, total: int) -> float:
    """Linear warmup over warmup_steps (at most half the run), then cosine from lr to min_lr at `total`."""
    warmup = min(t.warmup_steps, total // 2)  # a 50-step warmup must not swallow a 40-step run
    if step < warmup:
        return t.lr * (step + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))


# ---- process / device setup --------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(t: TrainConfig) -> Dist:
    if t.threads:
        torch.set_num_threads(t.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {t.device!r} asked for but CUDA is not available")
    if world == 1 and t.parallel != "fsdp":
        return Dist(0, 1, torch.device(want))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:  # fsdp in a plain single process: a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def autocast_dtype(t: TrainConfig, device: torch.device):
    d = t.dtype if t.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if d not in ("bfloat16", "float32"):
        raise TrainError(f"dtype must be auto, bfloat16 or float32, got {t.dtype!r}")
    return torch.bfloat16 if d == "bfloat16" else None


class FamilyLossModule(torch.nn.Module):
    """Wraps the model so DDP/FSDP see family_loss as its forward (their hooks need forward to go through it)."""

    def __init__(self, model: FamilyModel, weights):
        super().__init__()
        self.model, self.weights = model, weights

    def forward(self, tokens_BT, targets_BT):
        return family_loss(self.model, tokens_BT, targets_BT, self.weights)




def make_optimizer(model: FamilyModel, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (a frozen trunk gets no optimizer state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda  # one kernel for the whole update on CUDA
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused)
    if t.cuda_graph:
        _capturable(opt, next(model.parameters()).device)
    return opt


def _capturable(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Ready `opt` for a captured step: its learning rate becomes one device tensor (set with fill_
    before each replay) and its groups capturable. Again after load_state_dict, which restores the
    saved groups' plain values."""
    lr = torch.tensor(float(opt.param_groups[0]["lr"]), dtype=torch.float32, device=device)
    for group in opt.param_groups:
        group["lr"], group["capturable"] = lr, True


# ---- a run -------------------------------------------------------------------------------------

@dataclass
class TrainRun:
    """One run once set up: what the loop, saving and resuming share."""
    mcfg: FamilyConfig
    t: TrainConfig
    plan: TrainPlan
    d: Dist
    model: FamilyModel               # the unwrapped model: its state_dict is the checkpoint's
    net: torch.nn.Module             # the loss module as wrapped for DDP/FSDP: what a step calls
    opt: torch.optim.Optimizer
    data: TokenData
    tok: object                      # the tokenizer every checkpoint carries
    amp: torch.dtype | None          # autocast dtype; None = no autocast
    out: Path


# ---- state -------------------------------------------------------------------------------------

def save_state(run: TrainRun, step: int, exit_val_loss) -> None:
    """Checkpoint (serving artefact) then trainer state, each atomic; both record `step`.

    Call it on every rank: rank 0 writes the files. Under fsdp (`run.net` sharded) every rank first
    gathers the full weights to rank 0 for the checkpoint, then writes its own shards of the weights
    and optimizer (trunk/dist_checkpoint.py), which trainer_state.pt then names.
    """
    out, model, opt, plan, t, net = run.out, run.model, run.opt, run.plan, run.t, run.net
    main = run.d.main
    sharded = parallel.is_sharded(net)
    full = dist_checkpoint.gather_full_state(model) if sharded else None
    if main:
        save_checkpoint(out, model, run.tok, exit_val_loss=exit_val_loss,
                        tokens_seen=step * plan.global_batch * t.seq_len,
                        flops_seen=step * plan.global_batch * t.seq_len * plan.flops_per_token,
                        train_config=dataclasses.asdict(t), dtype=t.save_dtype, extra={"step": step},
                        state_dict=full)
    if sharded:
        weights = {"sharded": dist_checkpoint.save(out, step, net, opt)}
    elif main:
        weights = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   "optimizer": opt.state_dict()}
    if not main:
        return
    state = {
        "step": step,
        **weights,
        "scheduler": {"step": step, "total": plan.steps},  # the LR is a pure function of step (lr_at)
        "data": {"cursor": step * plan.global_batch, "seed": t.seed},
        "rng": rng_state(),
        "model_config": run.mcfg.to_dict(),
        "train_config": dataclasses.asdict(t),
    }
    write_trainer_state(out / STATE_FILE, state)
    if sharded:
        dist_checkpoint.prune(out, state["sharded"])


def load_state(run: TrainRun, directory: Path) -> int:
    """Restore `run` from the state in `directory`; the step it stopped at."""
    model, opt, plan, net = run.model, run.opt, run.plan, run.net
    path = directory / STATE_FILE
    if not path.is_file():
        raise TrainError(f"{path}: no trainer state to resume from")
    state = read_trainer_state(path, TrainError)   # tensors and plain data only: a crafted file cannot run code
    if state["model_config"] != run.mcfg.to_dict():
        raise TrainError(f"{path}: model config differs from the one being trained")
    if state["data"]["cursor"] != state["step"] * plan.global_batch:
        raise TrainError(f"{path}: global batch differs from the saved run's; resume needs the same one")
    meta_step = read_meta(directory).get("step")
    if meta_step != state["step"]:
        raise TrainError(f"{directory}: family.json is at step {meta_step}, trainer state at {state['step']}")
    sharded = parallel.is_sharded(net)
    if sharded != ("sharded" in state):
        was = "fsdp" if "sharded" in state else "ddp (or one process)"
        raise TrainError(f"{path}: saved under --parallel {was}; resume with the same --parallel")
    if sharded:
        folder = directory / state["sharded"]
        if not (folder / ".metadata").is_file():
            raise TrainError(f"{folder}: sharded trainer state missing or incomplete")
        dist_checkpoint.load(folder, net, opt)
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if run.t.cuda_graph:
            _capturable(opt, run.d.device)
        else:  # a state saved by a --cuda-graph run: back to plain groups
            for group in opt.param_groups:
                group["lr"], group["capturable"] = float(group["lr"]), False
    set_rng_state(state["rng"])
    return int(state["step"])


# ---- the loop ----------------------------------------------------------------------------------

def _to(arr: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(arr).to(device, non_blocking=True)
    return x[:, :-1], x[:, 1:]  # inputs, next-token targets


@torch.no_grad()
def evaluate(model: FamilyModel, data: TokenData, t: TrainConfig, d: Dist, amp, net=None) -> list[float]:
    """Per-exit mean validation CE over a fixed set of eval_batches * world micro-batches, split over ranks.

    A sharded model only runs through its FSDP root, so pass `net` then (every rank runs the same
    number of batches, as FSDP's collectives need)."""
    sharded = net is not None and parallel.is_sharded(net)
    model.eval()
    G = model.cfg.G
    sums = torch.zeros(G + 1, dtype=torch.float64, device=d.device)
    n = t.eval_batches * d.world  # the val set is eval_batches * batch_size * world sequences
    for b in range(d.rank, n, d.world):
        x, y = _to(data.val_batch(b, t.batch_size, n), d.device)
        with _autocast(d.device, amp):
            _, per_exit = net(x, y) if sharded else family_loss(model, x, y)
        sums[:G] += per_exit.double()
        sums[G] += 1
    if d.world > 1:
        dist.all_reduce(sums)
    model.train()
    return (sums[:G] / sums[G].clamp(min=1)).tolist()


def _autocast(device, amp):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp)


def train_step(step: int, net, opt, data: TokenData, t: TrainConfig, plan: TrainPlan, d: Dist, amp) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the global mean loss as a 0-d tensor on
    the device, unread: the host goes on launching the next step (float() it only where it is shown)."""
    lr = lr_at(step, t, plan.steps)
    for group in opt.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=d.device)
    for m in range(t.grad_accum):
        cursor = step * plan.global_batch + (m * d.world + d.rank) * t.batch_size
        x, y = _to(data.train_batch(cursor, t.batch_size, t.seed), d.device)
        sync = m == t.grad_accum - 1 or d.world == 1
        with parallel.grad_sync(net, sync), _autocast(d.device, amp):
            loss, _ = net(x, y)
            (loss / t.grad_accum).backward()
        total += loss.detach() / t.grad_accum
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if d.world > 1:
        dist.all_reduce(total)
        total /= d.world
    return total


class GraphedStep:
    """train_step as one CUDA graph: forward, backward, gradient clipping and the fused AdamW update,
    replayed with one launch per step.

    A model of a few million parameters runs each of its hundreds of kernels per step in microseconds,
    so its eager step is bound by launching them, and several such runs sharing one GPU time-slice it.
    Here the first WARMUP steps run eagerly on a side stream (the allocator, cuBLAS and Triton's
    compilation warm up outside the capture; they are real steps of the run), then one step is captured
    and every later step replays it. Everything the step touches keeps its address: the batch is copied
    into a static token buffer (through two pinned host buffers, so the host runs at most two steps
    ahead), the learning rate into the optimizer's device tensor, and the gradients stay the tensors
    the captured backward wrote. The same kernels run as in eager mode (the fused linear cross-entropy
    included), on the same batches in the same order.
    """

    WARMUP = 3

    def __init__(self, run: TrainRun):
        t, dev = run.t, run.d.device
        self.run = run
        self.tokens = torch.zeros(t.batch_size, t.seq_len + 1, dtype=torch.long, device=dev)
        self.pinned = [torch.empty(t.batch_size, t.seq_len + 1, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self.copied: list = [None, None]  # per pinned buffer: an event once its copy to the device has run
        self.loads = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.warm = 0

    def _load(self, step: int) -> None:
        run = self.run
        arr = run.data.train_batch(step * run.plan.global_batch, run.t.batch_size, run.t.seed)
        i = self.loads % 2
        if self.copied[i] is not None:
            self.copied[i].synchronize()  # the copy that last read this buffer has run
        self.pinned[i].numpy()[:] = arr
        self.tokens.copy_(self.pinned[i], non_blocking=True)
        self.copied[i] = torch.cuda.Event()
        self.copied[i].record()
        self.loads += 1

    def _body(self) -> torch.Tensor:
        run = self.run
        with _autocast(run.d.device, run.amp):
            loss, _ = run.net(self.tokens[:, :-1], self.tokens[:, 1:])
            loss.backward()
        if run.t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.net.parameters(), run.t.grad_clip)
        run.opt.step()
        return loss.detach()

    def __call__(self, step: int) -> torch.Tensor:
        run = self.run
        run.opt.param_groups[0]["lr"].fill_(lr_at(step, run.t, run.plan.steps))  # shared by every group
        self._load(step)
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        if self.warm < self.WARMUP:
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable=True.*")  # eager steps of a capturable opt
                loss = self._body()
                run.opt.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            self.warm += 1
            return loss
        # capture (recording, not running) then run the step by replaying it: the gradients are
        # allocated inside the capture, so the captured backward writes them in place every replay
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.loss = self._body()
        self.graph.replay()
        return self.loss


def _parallel_config(t: TrainConfig) -> parallel.ParallelConfig:
    pcfg = parallel.ParallelConfig(t.parallel, t.activation_checkpointing, t.compile)
    try:
        pcfg.validate()
    except parallel.ParallelError as e:
        raise TrainError(str(e)) from None
    return pcfg


def compile_blocks(model: FamilyModel) -> None:
    """torch.compile every decoder block in place (trunk layers and exit branches; state_dict names
    unchanged). A small model's step is mostly unfused elementwise passes over the fp32 residual stream
    (norms, RoPE, SwiGLU, adds, casts: docs/isoflop.md); compiling the blocks fuses them, while the
    fused multi-exit loss and the optimizer stay as they are. Blocks of one shape share one compiled
    graph; evaluation (no grad) compiles once more."""
    for blk in model.layers:
        blk.compile()
    for head in model.heads:
        for blk in head.branch:
            blk.compile()


def _check_step_options(t: TrainConfig, d: Dist) -> None:
    """--compile-blocks and --cuda-graph: the combinations they are built and tested for, else one line."""
    if t.compile_blocks:
        why = ("--compile compiles the whole loss module already: choose one" if t.compile else
               "it runs one process (not under torchrun)" if d.world > 1 else
               "not with --activation-checkpointing yet" if t.activation_checkpointing else None)
        if why:
            raise TrainError(f"--compile-blocks: {why}")
    if not t.cuda_graph:
        return
    why = ("it needs CUDA" if d.device.type != "cuda" else
           "it runs one process (not under torchrun)" if d.world > 1 else
           "it captures one micro-batch per step: set grad_accum 1" if t.grad_accum != 1 else
           "torch.compile makes its own graphs: drop --compile" if t.compile else None)
    if why:
        raise TrainError(f"--cuda-graph: {why}")


def train(mcfg: FamilyConfig, t: TrainConfig) -> dict:
    """Run (or resume) training; returns the run record (written by rank 0)."""
    pcfg = _parallel_config(t)  # before setup: a bad --parallel must not start a process group
    d = setup(t)
    if not t.data:
        raise TrainError("no training data: set train.data (or --data) to a `familial-train prepare` directory")
    data = TokenData(t.data, t.seq_len)
    if data.vocab_size > mcfg.vocab_size:
        raise TrainError(f"data vocab {data.vocab_size} exceeds the model's vocab_size {mcfg.vocab_size}: "
                         f"add --model vocab_size={data.vocab_size} (or prepare the data with a smaller "
                         f"--vocab-size)")
    plan = make_plan(mcfg, t, d.world)
    _check_step_options(t, d)
    tok = data.tokenizer()
    out = Path(t.out)
    amp = autocast_dtype(t, d.device)
    pcfg.param_dtype = amp if t.parallel == "fsdp" else None  # fsdp gathers bf16 parameters on CUDA

    torch.manual_seed(t.seed)  # every rank builds the same full model; fsdp then keeps its shards
    if t.init:
        model, tok = adapt.load_init(mcfg, t.init, data.index["tokenizer"] | {"vocab_size": data.vocab_size})
    else:
        model = FamilyModel(mcfg)
    adaptation = adapt.set_trainable(model, t.train)
    model = model.to(d.device)
    if t.compile_blocks:
        compile_blocks(model)
    weights = t.exit_weights or None
    loss_module = (adapt.DistillLoss(model, weights, t.distill, t.distill_temp) if t.distill
                   else FamilyLossModule(model, weights))
    net = parallel.wrap(model, loss_module, pcfg, d.device, d.world)
    opt = make_optimizer(model, t)  # after wrapping: under fsdp the parameters are now sharded DTensors
    run = TrainRun(mcfg, t, plan, d, model, net, opt, data, tok, amp, out)
    start = 0
    resume_dir = out if t.resume == "auto" else (Path(t.resume) if t.resume else None)
    if resume_dir is not None and (t.resume != "auto" or (out / STATE_FILE).is_file()):
        start = load_state(run, resume_dir)
        if start >= plan.steps:
            raise TrainError(f"{resume_dir}: nothing to resume, already at step {start} of {plan.steps}")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if t.progress:  # what was asked for, before hours go into it (the bar then shows the ETA)
            epochs = plan.tokens / max(1, data.num_windows("train") * t.seq_len)
            print(f"plan: {plan.steps} steps x {plan.global_batch} sequences x {t.seq_len} tokens = "
                  f"{plan.tokens:,} tokens ({epochs:.2f} epochs of {t.data}), "
                  f"{plan.tokens * plan.flops_per_token:.3g} FLOPs", file=sys.stderr, flush=True)
    extra = adapt.record_start(t, adaptation, out, start, d.main, lambda: evaluate(model, data, t, d, amp))
    return _loop(run, start, extra)


def _loop(run: TrainRun, start: int, record_extra: dict | None = None) -> dict:
    """Steps [start, stop), evaluating, logging and saving on schedule; the run record."""
    from tqdm import tqdm

    model, net, opt, data, t, plan, d, amp, out = (run.model, run.net, run.opt, run.data, run.t, run.plan, run.d,
                                                   run.amp, run.out)
    stop = min(plan.steps, t.stop_at) if t.stop_at else plan.steps
    bar = tqdm(total=plan.steps, initial=start, desc="train", unit="step", disable=not (t.progress and d.main))
    metrics = open(out / "metrics.jsonl", "a") if d.main else None
    val, t0, loss, step = None, time.time(), float("nan"), start
    step_s = 0.0  # time in train_step after the first step (which pays for compilation and autotuning)
    graphed = GraphedStep(run) if t.cuda_graph else None
    untimed = 1 + (GraphedStep.WARMUP if graphed else 0)  # steps that pay for warm-up and capture
    try:
        for step in range(start, stop):
            ts = time.perf_counter()
            loss_t = (graphed(step) if graphed else  # not read yet: no host sync per step
                      train_step(step, net, opt, data, t, plan, d, amp))
            done = step + 1
            rec = {"step": done, "lr": lr_at(step, t, plan.steps)}
            eval_now = (t.eval_every and done % t.eval_every == 0) or done == plan.steps
            shown = eval_now or done % max(1, t.log_every) == 0 or done == start + 1
            if shown:  # reading the loss waits for the steps launched so far: step_s sums GPU time
                loss = rec["loss"] = float(loss_t)
            step_s += (time.perf_counter() - ts) if step >= start + untimed else 0.0
            if eval_now:
                val = evaluate(model, data, t, d, amp, net)
                rec["exit_val_loss"] = val
            if shown:
                bar.set_postfix(loss=f"{loss:.4f}", **({"val": f"{val[-1]:.4f}"} if val else {}))
            if metrics and shown:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            bar.update(1)
            if t.save_every and done % t.save_every == 0 and done < stop:
                save_state(run, done, val)
        done = stop
        if val is None or done != plan.steps:
            val = evaluate(model, data, t, d, amp, net)
        save_state(run, done, val)
    finally:
        bar.close()
        if metrics:
            metrics.close()
    record = run_record(run.mcfg, t, plan, done, val, time.time() - t0, d.world) | (record_extra or {})
    timed = max(0, done - start - untimed)
    record["throughput"] = {"timed_steps": timed, "step_seconds": round(step_s, 4),
                            "tokens_per_s": timed * plan.global_batch * t.seq_len / step_s if step_s > 0 else None}
    if d.main and done == plan.steps:
        path = Path(t.run_record) if t.run_record else out / "runs.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if d.world > 1:
        dist.barrier()
    return record


def run_record(mcfg: FamilyConfig, t: TrainConfig, plan: TrainPlan, steps_done: int, val: list[float],
               seconds: float, world: int) -> dict:
    """The run record (docs/run-record.md). D counts the tokens actually trained."""
    pc = param_counts(mcfg)
    D = steps_done * plan.global_batch * t.seq_len
    w = exit_weights(mcfg.G, t.exit_weights or None)
    return {
        "schema": RUN_SCHEMA,
        "run_id": uuid.uuid4().hex[:12],
        "N": pc.non_embedding,
        "N_total": pc.total,
        "D": D,
        "G": mcfg.G,
        "exit_layers": list(mcfg.exit_layers),
        "n_layers": mcfg.n_layers,
        "flops_per_token": plan.flops_per_token,
        "flops_total": plan.flops_per_token * D,
        "exit_val_loss": [float(v) for v in val],
        "loss": float(sum(wi * v for wi, v in zip(w, val))),
        "steps": steps_done,
        "global_batch": plan.global_batch,
        "seq_len": t.seq_len,
        "world_size": world,
        "config": {"model": mcfg.to_dict(), "train": dataclasses.asdict(t)},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_seconds": round(seconds, 3),
    }
