"""Shared synthetic sweeps and fits for the fitting tests (session-scoped: each is fitted once)."""
import pytest

from fitting.fitter import FitConfig, fit
from fitting.synthetic import isoflop_sweep


@pytest.fixture(scope="session")
def clean_runs():
    """258 runs of the paper's law: 9 budgets 1e17..1e21, 5 sizes each, G = 1..6 (runs outside N in
    [1e7, 1e10], D in [1e8, 1e12] dropped), no noise."""
    return isoflop_sweep(noise=0.0)


@pytest.fixture(scope="session")
def noisy_runs():
    """The same sweep with 1 % log-normal noise on every loss."""
    return isoflop_sweep(noise=0.01, seed=1)


@pytest.fixture(scope="session")
def clean_fit_paper(clean_runs):
    return fit("family", clean_runs.lawdata(), FitConfig(grid="paper"))


@pytest.fixture(scope="session")
def noisy_fit_hoffmann(noisy_runs):
    return fit("family", noisy_runs.lawdata(), FitConfig(grid="hoffmann"))
