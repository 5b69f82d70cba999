"""Dependencies point left: kernels <- trunk <- deploy <- relay <- serving; fitting stands apart and
imports nothing of ours but trunk.config / trunk.flops (and trunk.cmdline, the standard-library-only
CLI convention). Checked by walking every import with `ast`."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["kernels", "trunk", "deploy", "relay", "serving"]
PARTS = ORDER + ["fitting"]
FITTING_MAY_IMPORT = {"trunk", "trunk.config", "trunk.flops", "trunk.cmdline"}  # cmdline: the CLI convention


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _files(part):
    return sorted((ROOT / part).rglob("*.py"))


@pytest.mark.parametrize("part", PARTS)
def test_imports_point_left(part):
    if not (ROOT / part).is_dir():
        pytest.skip(f"{part}/ not present")
    bad = []
    for f in _files(part):
        for mod in _imports(f):
            top = mod.split(".")[0]
            if top not in PARTS or top == part:
                continue
            if part == "fitting":
                ok = mod in FITTING_MAY_IMPORT
            elif top == "fitting":
                ok = False
            else:
                ok = ORDER.index(top) < ORDER.index(part)
            if not ok:
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_no_part_imports_fitting_or_serving_from_below():
    # kernels imports only torch and triton (and the standard library)
    if not (ROOT / "kernels").is_dir():
        pytest.skip("kernels/ not present")
    for f in _files("kernels"):
        for mod in _imports(f):
            assert mod.split(".")[0] not in set(PARTS) - {"kernels"}, f"{f} imports {mod}"


def test_importing_fitting_loads_no_kernels_model_or_triton():
    """`import fitting` (and its planner and CLI) is light: no triton, no kernels, no model, and the
    Triton interpreter switch stays untouched (a fresh interpreter, so nothing else imported them)."""
    import os
    import subprocess
    import sys

    code = ("import os, sys, fitting, fitting.planner, fitting.cli\n"
            "heavy = [m for m in ('triton', 'kernels', 'trunk.model', 'trunk.stage') if m in sys.modules]\n"
            "print(heavy, os.environ.get('TRITON_INTERPRET'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] None", out.stdout
