"""Helpers the relay tests import: the `Family` under test, its reference model, and real grpc.aio
nodes on loopback (`chain`). The pytest fixtures that build a family live in conftest.py.

The family is `trunk/builtin/` when a trained built-in checkpoint is committed there, and otherwise
a tiny random one (preset "tiny" with one branch layer per exit head, so exit-branch KV is exercised)
saved with trunk.checkpoint and split with deploy.shards.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = ROOT / "trunk" / "builtin"
TIERS = "device=0,edge=1,cloud=2.."


@dataclass
class Family:
    name: str
    ckpt: Path
    shards: Path
    model: object   # trunk FamilyModel, eval, float32: the single-process reference

    def ref_token(self, tokens: list[int], g: int) -> int:
        """argmax of exit g's logits at the last position of a full run over `tokens`."""
        with torch.inference_mode():
            return int(self.model(torch.tensor([tokens]), exits=[g])[0][0, -1].argmax())

    def ref_logits(self, tokens: list[int], g: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(torch.tensor([tokens]), exits=[g])[0][0, -1]


def tiny_checkpoint(d: Path) -> Path:
    from trunk.checkpoint import save_checkpoint
    from trunk.config import get_preset
    from trunk.model import FamilyModel
    from trunk.tokenizer import ByteTokenizer

    torch.manual_seed(1234)
    model = FamilyModel(get_preset("tiny").replace(branch_layers=1))
    with torch.no_grad():  # larger weights than the init so the exits disagree and argmax margins are wide
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return save_checkpoint(d, model, ByteTokenizer(), exit_val_loss=[3.1, 2.7, 2.4])


def make_family(tmp: Path, ckpt: Path, name: str) -> Family:
    from deploy.shards import split_checkpoint
    from trunk.checkpoint import load_checkpoint

    shards = tmp / "shards"
    split_checkpoint(ckpt, shards, TIERS)
    model, _, _ = load_checkpoint(ckpt)
    return Family(name, ckpt, shards, model.float().eval())


def stage(fam: Family, tier: str):
    """PyTorch stage in float32, the reference's dtype (fp16 shards upcast exactly)."""
    from deploy.shards import load_tier
    return load_tier(fam.shards, tier, dtype=torch.float32)


@contextlib.asynccontextmanager
async def chain(fam: Family, *, stages=None, device_kw=None, edge_kw=None, cloud_kw=None):
    """device -> edge -> cloud on loopback; yields the three NodeHandles (head first)."""
    from relay.cli import start_node

    stages = stages or {t: stage(fam, t) for t in ("device", "edge", "cloud")}
    cloud = await start_node(stage=stages["cloud"], **(cloud_kw or {}))
    edge = await start_node(stage=stages["edge"], next=f"127.0.0.1:{cloud.port}", **(edge_kw or {}))
    dev = await start_node(stage=stages["device"], next=f"127.0.0.1:{edge.port}", **(device_kw or {}))
    handles = [dev, edge, cloud]
    try:
        yield handles
    finally:
        for h in handles:
            await h.stop()


def run(coro):
    return asyncio.run(coro)
