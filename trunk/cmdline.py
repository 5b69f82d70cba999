"""The command-line convention every `familial-*` tool follows: one parser class, one error line, one log setup.

    familial-train, familial-deploy, familial-serve, familial-fit, familial-plan (and `python -m relay.cli`)

- Help has one layout: a description paragraph, option groups, `(default: X)` at the end of every
  option's help (added here from the option's default; an option whose default is computed or secret
  writes its own `(default: ...)`), and an epilog ending with the exit-status line below.
- Bad input of any kind (a bad flag, a missing file, a config the library refuses) is one line on
  stderr, `PROG: error: MESSAGE`, and exit status 2, never a traceback or a usage block. A tool's
  `main(argv) -> int` wraps its body in `run(...)`, which turns `CLIError` and the tool's own error
  types into that line and returns 2; the console script exits with what `main` returns.
- Progress and start-up messages go through `logging` at INFO (`log_to_stderr`); WARNING is for things
  that are wrong or risky.

This file imports only the standard library: `fitting` (which must stay light) uses it too. It knows
nothing about any one tool's flags.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import textwrap
from typing import Callable, NoReturn

EXIT_BAD_INPUT = 2
EXIT_NOTE = "Exit status: 0 on success; 2 on bad input, with one line on stderr ({prog}: error: ...)."


class CLIError(Exception):
    """Bad input found by a command line: shown as one line `PROG: error: MESSAGE`, exit status 2."""


def one_line(message) -> str:
    return " ".join(str(message).split())


def error_line(prog: str, message) -> str:
    return f"{prog}: error: {one_line(message)}"


def warn(prog: str, message) -> None:
    print(f"{prog}: warning: {one_line(message)}", file=sys.stderr, flush=True)


def fail(message) -> NoReturn:
    """Stop with `message` as the one error line (printed by `run`)."""
    raise CLIError(message)


def run(prog: str, body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = ()) -> int:
    """`body()`'s exit status (None = 0); `CLIError` or one of `errors`: the one error line, and 2."""
    try:
        return body() or 0
    except (CLIError, *errors) as e:
        print(error_line(prog, e), file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def _wrap(text: str | None) -> str | None:
    """Paragraphs (blank-line separated) filled to the terminal; a paragraph with indented lines is kept."""
    if not text:
        return text
    width = min(shutil.get_terminal_size().columns, 102) - 2
    paras = [p if any(l[:1].isspace() for l in p.splitlines())
             else textwrap.fill(" ".join(p.split()), width, break_on_hyphens=False)  # keep familial-serve whole
             for p in text.strip("\n").split("\n\n")]
    return "\n\n".join(paras)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as `Parser` wrapped them; `(default: X)` after each option's help.

    Like argparse's own ArgumentDefaultsHelpFormatter (the same one-method hook), but silent where a
    default says nothing (None, False, empty) and where the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (not action.option_strings or "default" in text or d is None or d is False or d is argparse.SUPPRESS
                or d in ("", [], ())):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the shared layout and the one-line error (argparse would print the usage block too).

    Subparsers made with `add_subparsers()` are Parsers too, so a subcommand's mistake is the same line."""

    def __init__(self, prog: str | None = None, *, description: str | None = None, epilog: str | None = None,
                 **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        tool = (prog or os.path.basename(sys.argv[0])).split()[0]  # a subcommand's errors name the tool
        epilog = "\n\n".join(filter(None, [epilog and epilog.strip("\n"), EXIT_NOTE.format(prog=tool)]))
        super().__init__(prog, description=_wrap(description), epilog=_wrap(epilog), **kw)

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


def log_to_stderr() -> None:
    """Our loggers (`familial.*`) at INFO, everything else at WARNING, one timestamped line each."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("familial").setLevel(logging.INFO)
