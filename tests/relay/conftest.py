"""Shared fixtures for the relay tests: a family checkpoint split into device/edge/cloud shards and its
single-process reference model (built by `relay_helpers`, where the helpers tests import also live).
"""
from __future__ import annotations

import pytest

from tests.relay.relay_helpers import BUILTIN, Family, make_family, tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Family:
    tmp = tmp_path_factory.mktemp("tiny")
    return make_family(tmp, tiny_checkpoint(tmp / "ckpt"), "tiny-random")


@pytest.fixture(scope="session")
def builtin_family(tmp_path_factory) -> Family | None:
    if not (BUILTIN / "family.json").is_file():
        return None
    return make_family(tmp_path_factory.mktemp("builtin"), BUILTIN, "builtin")


@pytest.fixture(scope="session")
def family(builtin_family, tiny_family) -> Family:
    """The built-in family when committed, else the tiny random one."""
    return builtin_family or tiny_family
