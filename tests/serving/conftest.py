"""Fixtures for the serving tests: a tiny real checkpoint and real HTTP servers on loopback."""
from __future__ import annotations

import pytest
import torch

from serving_helpers import ServerThread


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from trunk import FamilyModel, get_preset
    from trunk.checkpoint import save_checkpoint
    from trunk.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = FamilyModel(get_preset("tiny"))
    d = tmp_path_factory.mktemp("tiny_ckpt")
    save_checkpoint(d, model, ByteTokenizer(), exit_val_loss=[3.1, 2.6, 2.2])
    return d


@pytest.fixture
def serve():
    servers = []

    def start(app):
        s = ServerThread(app).__enter__()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.__exit__(None, None, None)
