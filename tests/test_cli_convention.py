"""Every `familial-*` tool follows `trunk/cmdline.py`: one help layout (description, option groups,
defaults shown as `(default: X)`, the exit-status epilog) and one error line `PROG: error: ...` with
exit status 2 for a bad argument."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tools():
    from deploy.cli import main as deploy
    from fitting.cli import fit_main, plan_main
    from serving.cli import main as serve
    from trunk.cli import main as train

    return {"familial-train": train, "familial-deploy": deploy, "familial-serve": serve, "familial-fit": fit_main,
            "familial-plan": plan_main}


def _parsers():
    from deploy.cli import build_parser as deploy
    from fitting.cli import _fit_parser, _plan_parser
    from serving.cli import build_demo_parser, build_parser as serve
    from trunk.cli import build_parser as train

    _, subs = train()
    return [*subs.values(), deploy(), serve(), build_demo_parser(), _fit_parser(), _plan_parser()]


def _exit_code(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as e:  # --help exits through argparse
        return e.code


@pytest.mark.parametrize("prog", ["familial-train", "familial-deploy", "familial-serve", "familial-fit",
                                  "familial-plan"])
def test_help_has_the_shared_layout(prog, capsys):
    assert _exit_code(_tools()[prog], ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ") and "options:" in out
    text = " ".join(out.split())
    assert f"Exit status: 0 on success; 2 on bad input, with one line on stderr ({prog}: error: ...)." in text


def test_every_parser_shows_defaults_the_same_way():
    import re

    from trunk.cmdline import Parser

    for p in _parsers():
        assert isinstance(p, Parser), p.prog  # so it has the shared formatter and error line
        text = " ".join(p.format_help().split())
        assert not re.search(r"\(default[ =]|, default\b|\(default\)", text), (p.prog, text)  # only "(default: X)"


@pytest.mark.parametrize("prog,argv", [
    ("familial-train", ["prepare", "--no-such-flag"]), ("familial-train", ["--steps", "x"]),
    ("familial-deploy", ["split"]), ("familial-serve", ["--tier", "edge", "--port", "x"]),
    ("familial-serve", ["demo", "--no-such-flag"]), ("familial-fit", ["--law", "nope"]),
    ("familial-plan", ["--flops", "1e20"]),
])
def test_a_bad_argument_is_one_line_naming_the_tool_and_exit_2(prog, argv, capsys):
    assert _tools()[prog](argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "usage" not in err, err


def test_relay_node_module_follows_it_too():
    r = subprocess.run([sys.executable, "-m", "relay.cli", "--tier", "edge", "--port", "x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("python3 -m relay.cli: error: argument --port: invalid int value"), r.stderr
