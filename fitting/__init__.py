"""Familial scaling laws: the laws themselves, a vectorised robust fitter, figures and a tier planner.

`fitting` stands apart from the model stack: it reads run records and writes plans. It imports nothing
of ours except `trunk.config` / `trunk.flops`, and only in the planner, so `import fitting` loads no
torch model code, no kernels and no triton.
"""
from fitting.laws import (BranchParams, LawParams, PAPER, PAPER_BRANCH, branch_loss, dense_loss, family_law_loss,
                          frontier, frontier_numeric)
from fitting.leverage import efficiency_leverage, efficiency_leverage_compute

__all__ = [
    "BranchParams", "LawParams", "PAPER", "PAPER_BRANCH", "branch_loss", "dense_loss",
    "efficiency_leverage", "efficiency_leverage_compute", "family_law_loss", "frontier", "frontier_numeric",
]
