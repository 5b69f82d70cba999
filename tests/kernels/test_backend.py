"""The switch (FAMILIAL_KERNELS), the dispatcher table lookup, and the shape of the package."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import importlib

import kernels
from kernels import attention_decode, attention_prefill, dispatch, linear_ce
from kernels.backend import use_triton
from ktest import DEVICE, HAS_CUDA

exit_head = importlib.import_module("kernels.exit_head")  # the module; `kernels.exit_head` is the op
ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    (attention_prefill.prefill_attention_triton, attention_prefill.prefill_attention_reference),
    (attention_prefill.write_kv_cache_triton, attention_prefill.write_kv_cache_reference),
    (attention_decode.decode_attention_triton, attention_decode.decode_attention_reference),
    (exit_head.exit_head_triton, exit_head.exit_head_reference),
    (linear_ce.multi_exit_linear_cross_entropy_triton, linear_ce.multi_exit_linear_cross_entropy_reference),
]


@pytest.mark.parametrize("fast,ref", PAIRS, ids=lambda f: f.__name__)
def test_every_kernel_has_a_reference_with_its_signature(fast, ref):
    assert inspect.signature(fast) == inspect.signature(ref)


def test_switch_modes(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("FAMILIAL_KERNELS", "torch")
    assert not use_triton(x)
    monkeypatch.setenv("FAMILIAL_KERNELS", "auto")
    assert use_triton(x) is False  # CPU tensors: reference
    monkeypatch.setenv("FAMILIAL_KERNELS", "bogus")
    with pytest.raises(ValueError):
        use_triton(x)
    monkeypatch.setenv("FAMILIAL_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError):
            use_triton(x)


def test_forced_triton_runs_the_kernel_on_cpu(monkeypatch):
    """FAMILIAL_KERNELS=triton through the public op: the kernel (interpreted here) gives the result."""
    h = torch.randn(3, 32, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    W = torch.randn(341, 32, device=DEVICE)
    called = []
    orig = exit_head.exit_head_triton
    monkeypatch.setattr(kernels, "exit_head_triton", lambda *a, **k: called.append(1) or orig(*a, **k))
    monkeypatch.setenv("FAMILIAL_KERNELS", "triton")
    out = kernels.exit_head(h, w, W, eps=1e-6)
    ref = exit_head.exit_head_reference(h, w, W, eps=1e-6)
    assert called and torch.equal(out.token, ref.token)


def test_prefill_falls_back_when_autograd_needs_a_graph(monkeypatch):
    monkeypatch.setenv("FAMILIAL_KERNELS", "triton")
    q = torch.randn(1, 2, 9, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 9, 32, device=DEVICE)
    out = kernels.prefill_attention(q, k, k)
    out.sum().backward()  # the Triton kernel has no backward: this went through SDPA
    assert q.grad is not None


def test_dispatch_table_lookup():
    table = {"prefill": [
        {"head_dim": 128, "causal": True, "seq_len": 512, "choice": "sdpa"},
        {"head_dim": 128, "causal": True, "seq_len": 8192, "choice": "triton"},
    ]}
    assert dispatch.prefill_choice(128, True, 600, table) == "sdpa"
    assert dispatch.prefill_choice(128, True, 4096, table) == "triton"  # nearer 8192 on a log scale
    assert dispatch.prefill_choice(64, True, 4096, table) == "sdpa"     # unmeasured: SDPA
    assert dispatch.prefill_choice(128, False, 4096, table) == "sdpa"


def test_committed_table_comes_from_committed_results():
    table = dispatch.load_table()
    if not table:
        pytest.skip("no dispatch table committed yet")
    src = ROOT / table["source"]
    results = json.loads(src.read_text())
    measured = {(r["head_dim"], r["causal"], r["seq_len"]) for r in results["rows"] if r.get("triton_tflops")}
    for row in table["prefill"]:
        assert (row["head_dim"], row["causal"], row["seq_len"]) in measured
        assert row["choice"] in ("triton", "sdpa")


def test_kernels_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, kernels\n"
        "h = torch.randn(2, 16); W = torch.randn(50, 16)\n"
        "out = kernels.exit_head(h, torch.ones(16), W, eps=1e-6)\n"
        "loss = kernels.multi_exit_linear_cross_entropy([h], W, torch.tensor([1, 2]))\n"
        "print(out.token.shape, float(loss) > 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([2]) True" in res.stdout


def test_kernels_imports_only_torch_and_triton():
    import ast
    allowed = {"torch", "triton", "kernels", "__future__"} | set(sys.stdlib_module_names)
    for f in sorted((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for n in names:
                assert n.split(".")[0] in allowed, f"{f.name} imports {n}"


def test_head_dims_the_kernels_do_not_tile_fall_back_to_the_reference(monkeypatch):
    monkeypatch.setenv("FAMILIAL_KERNELS", "triton")  # even forced: an unsupported shape is no error
    q = torch.randn(1, 4, 9, 80, device=DEVICE)
    k = torch.randn(1, 2, 9, 80, device=DEVICE)
    out = kernels.prefill_attention(q, k, k)
    ref = attention_prefill.prefill_attention_reference(q, k, k)
    assert torch.allclose(out, ref)
    dq = torch.randn(1, 1, 4, 80, device=DEVICE)
    out = kernels.decode_attention(dq, k, k, torch.tensor([9], device=DEVICE))
    assert torch.allclose(out, attention_decode.decode_attention_reference(dq, k, k, torch.tensor([9])))
