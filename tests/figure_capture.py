"""Figures as drawn, for tests that check what a plot shows (axes, labels, data) rather than its file size.

`saved_figures()` records every matplotlib `Figure` saved inside the block under its file name; the files
are still written. The figure code needs no hook for it: saving is the one step every figure goes through.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


@contextlib.contextmanager
def saved_figures():
    """Yields {file name: Figure} of every `Figure.savefig` call made inside the block."""
    got: dict[str, Figure] = {}
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        got[Path(fname).name] = self
        return original(self, fname, *args, **kwargs)

    Figure.savefig = savefig
    try:
        yield got
    finally:
        Figure.savefig = original


def visible_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def _as_set(arrays) -> set[tuple[float, float]]:
    return {(round(float(x), 9), round(float(y), 9)) for arr in arrays for x, y in np.asarray(arr)}


def scatter_points(ax) -> set[tuple[float, float]]:
    """Every (x, y) drawn with `scatter`, rounded so that sets compare."""
    return _as_set(c.get_offsets() for c in ax.collections if len(c.get_offsets()))


def marker_points(ax) -> set[tuple[float, float]]:
    """Every (x, y) of the lines drawn as markers only (`ax.plot(x, y, "o")`)."""
    return _as_set(ln.get_xydata() for ln in ax.get_lines() if ln.get_linestyle() in ("None", "", " "))


def line_data(ax) -> list[np.ndarray]:
    """The (n, 2) data of every line drawn with a line style (curves, not markers or axh/axv lines)."""
    return [ln.get_xydata() for ln in ax.get_lines()
            if ln.get_linestyle() not in ("None", "", " ") and len(ln.get_xydata()) > 2]
