"""The model and optimizer state of a sharded (FSDP2) run, through torch.distributed.checkpoint (DCP).

Each process writes and reads only its own shards; DCP's metadata lets a later run with another
number of processes reshard on load. Layout under the run's output directory:

    trainer_state.pt                 rank 0: step, data cursor, RNG, configs, and "sharded": the folder below
    trainer_state.dcp/step-00000008  DCP: .metadata + one __R_0.distcp per rank (fp32 weights, AdamW state)

The trainer writes the step's DCP folder first and trainer_state.pt (atomically) last, so
trainer_state.pt always names a complete folder; older step folders are removed after it is written.
For the serving checkpoint (model.safetensors), `gather_full_state` collects full tensors on rank 0.

Not here: what else the trainer state holds and the resume checks (trunk/train.py); the checkpoint
format itself (trunk/checkpoint.py); DDP and one-process runs, whose trainer state is one torch.save
file written by rank 0.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

FOLDER = "trainer_state.dcp"


def step_folder(step: int) -> str:
    """Path of a step's DCP folder relative to the output directory."""
    return f"{FOLDER}/step-{step:08d}"


def gather_full_state(model) -> dict:
    """Full (unsharded) CPU tensors of `model`'s state dict on rank 0, {} elsewhere. Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(out: Path, step: int, net, opt) -> str:
    """Write this rank's shards of the model and optimizer to the step's folder. Collective; returns
    the folder relative to `out` for the trainer state to name."""
    rel = step_folder(step)
    (out / rel).mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / rel))
    return rel


def load(folder: Path, net, opt) -> None:
    """Read this rank's shards (resharding if the world size changed) into the model and optimizer."""
    model_sd, optim_sd = get_state_dict(net, opt)  # templates: the current sharding of every tensor
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def prune(out: Path, keep: str) -> None:
    """Remove every step folder but `keep` (rank 0, after trainer_state.pt names `keep`)."""
    root = out / FOLDER
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and f"{FOLDER}/{p.name}" != keep:
            shutil.rmtree(p, ignore_errors=True)
