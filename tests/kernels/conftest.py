"""Kernel tests run the Triton kernels natively on CUDA, else in Triton's CPU interpreter.

Without CUDA the interpreter must be on before the process first imports triton (triton builds its
own tl.* functions at import); kernels/backend.py and this file both set TRITON_INTERPRET=1 before
that. If something imported triton earlier in compiled mode, every test here is skipped with the
reason instead of failing obscurely. Autotuning is off in tests (each small shape would compile
every config).
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA:
    # Must precede the first `import triton` of the process (kernels/backend.py does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_interpretable() -> str | None:
    """None if triton's own tl.* functions were built for the interpreter, else why not."""
    try:
        import triton.language.standard as std
        from triton.runtime.jit import JITFunction
    except ImportError:
        return "triton is not installed"
    if isinstance(std.max, JITFunction):
        return ("triton was imported before TRITON_INTERPRET=1 was set in this process; "
                "run tests/kernels in a fresh pytest process")
    return None


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    monkeypatch.setenv("FAMILIAL_KERNELS_AUTOTUNE", "0")
    monkeypatch.delenv("FAMILIAL_KERNELS", raising=False)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    why = None if HAS_CUDA else _triton_interpretable()
    for item in items:
        if "tests/kernels/" not in item.nodeid.replace("\\", "/") and "kernels/" not in str(item.fspath):
            continue
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif why:
            item.add_marker(pytest.mark.skip(reason=why))
