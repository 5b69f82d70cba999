"""Data parallelism for the trainer: DDP replicas or FSDP2 shards, plus activation checkpointing.

`wrap` turns a built model (and the loss module around it) into what the training loop calls:
- ddp:  every process holds the whole model and optimizer; gradients are all-reduced (nccl on CUDA,
        gloo on CPU). The default, and the fastest while a replica fits one GPU.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`, as torchtitan applies it). Parameters,
        gradients and AdamW state are sharded on dim 0 over all processes, so a family needs about
        16 bytes x params / world of GPU memory for them instead of 16 bytes x params. One
        communication group per decoder block, one per exit head, and a root group for the rest.

FSDP groups, and why the root group holds the unembeddings: FSDP2 all-gathers a group in the
forward pre-hook of its module(s) and reshards it after their forward. Exit head g runs as its
branch blocks, norm and adapter (`FamilyModel.exit_features` calls those modules, not the head), so
its group is that list of modules (`fully_shard([...])`: gathered when the first runs, resharded when
the last has run). The unembedding matrices, the tied embedding and any own exit unembeddings, are
read as `.weight` by the fused multi-exit linear-CE outside any module forward, so they belong to
the root group, i.e. the loss module: its parameters stay gathered for the whole forward of the root
(where `family_loss` runs) and are re-gathered for its backward; they are still stored sharded.

Mixed precision (CUDA): bf16 parameters for compute, fp32 gradient reduction, fp32 sharded master
weights and optimizer state (MixedPrecisionPolicy, as torchtitan does). The trainer's bf16 autocast
stays on around it, as under DDP, so both modes run the same model code.

Not here: tensor/pipeline parallelism; multi-node meshes (HSDP); torch.compile under fsdp or with
activation checkpointing (both refused with a message: the per-block compile torchtitan uses is not
wired up yet, and compiling the whole loss module around checkpointed blocks fails torch's recompute
check); the sharded trainer state (trunk/dist_checkpoint.py); process-group setup (trunk/train.py `setup`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

KINDS = ("ddp", "fsdp")


class ParallelError(ValueError):
    """A parallel setup that cannot run; one line."""


@dataclass
class ParallelConfig:
    kind: str = "ddp"                        # ddp | fsdp (see the module docstring)
    activation_checkpointing: bool = False   # recompute each decoder block's activations in the backward
    compile: bool = False                    # torch.compile the loss module (ddp / one process only)
    param_dtype: torch.dtype | None = None   # fsdp: dtype of gathered parameters (bf16 on CUDA); None = fp32

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ParallelError(f"parallel must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "fsdp" and self.compile:
            raise ParallelError("--compile is not supported with --parallel fsdp yet; use ddp or drop --compile")
        if self.compile and self.activation_checkpointing:  # dynamo's recompute metadata check fails
            raise ParallelError("--compile and --activation-checkpointing do not work together yet; drop one")


def decoder_blocks(model) -> list[nn.Module]:
    """Every decoder block: the trunk's layers, then each exit head's branch layers."""
    return [*model.layers, *(blk for head in model.heads for blk in head.branch)]


def exit_head_modules(head) -> list[nn.Module]:
    """The modules exit_features runs for a shallow exit head, in order (its FSDP group)."""
    return [*head.branch, head.norm, *([head.adapter] if head.adapter is not None else [])]


def checkpoint_activations(model) -> None:
    """Keep only each decoder block's input; recompute its inside in the backward (non-reentrant).

    The composable `checkpoint` hooks the module in place, so parameter names (and checkpoints)
    stay the same as without it.
    """
    from torch.distributed._composable import checkpoint

    for blk in decoder_blocks(model):
        checkpoint(blk)


def shard(model, loss_module: nn.Module, device: torch.device, param_dtype) -> nn.Module:
    """FSDP2 over all processes: one group per trunk block, per exit head, and the root (see above)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for blk in model.layers:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    for head in model.heads:
        fully_shard(exit_head_modules(head), mesh=mesh, mp_policy=mp)
    fully_shard(loss_module, mesh=mesh, mp_policy=mp)  # root: embed, final norm, unembeddings
    return loss_module


def wrap(model, loss_module: nn.Module, cfg: ParallelConfig, device: torch.device, world: int) -> nn.Module:
    """What the loop calls: net(tokens_BT, targets_BT) -> (loss, per-exit CE). Modifies model in place."""
    cfg.validate()
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    if cfg.kind == "fsdp":
        return shard(model, loss_module, device, cfg.param_dtype)
    net = torch.compile(loss_module) if cfg.compile else loss_module
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def grad_sync(net: nn.Module, sync: bool):
    """Context for one micro-batch's backward. DDP skips its all-reduce until the last micro-batch;
    FSDP reduce-scatters every micro-batch into the sharded gradient (no unsharded gradient is kept
    between micro-batches, which is the point of sharding); one process has nothing to sync."""
    if sync or not isinstance(net, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return net.no_sync()
