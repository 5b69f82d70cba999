"""Batched L-BFGS against SciPy on problems with known minima, rows independent of each other."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize as sp_minimize, rosen, rosen_der

from fitting.lbfgs import LBFGSConfig, minimize


def _rosen(x, rows):
    a, b = x[:, 0], x[:, 1]
    f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
    g = torch.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], -1)
    return f, g


def test_rosenbrock_rows_converge_to_the_minimum():
    x0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0], [-3.0, 5.0], [1.0, 1.0]], dtype=torch.float64)
    res = minimize(_rosen, x0, LBFGSConfig())
    np.testing.assert_allclose(res.x.numpy(), 1.0, atol=1e-8)
    assert res.converged.all()
    assert not res.moved[-1] and res.moved[:-1].all()                   # started at the minimum: never moved
    for x in x0[:-1].numpy():                                           # SciPy agrees
        r = sp_minimize(rosen, x, jac=rosen_der, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-11})
        np.testing.assert_allclose(r.x, 1.0, atol=1e-6)


def test_rows_use_their_own_data():
    targets = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-4.0, 7.0]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 100.0], [0.01, 1.0], [5.0, 5.0]], dtype=torch.float64)

    def quad(x, rows):                                                   # row r: sum scale_r (x - t_r)^2
        d = x - targets[rows]
        return (scale[rows] * d * d).sum(-1), 2 * scale[rows] * d

    res = minimize(quad, torch.zeros(3, 2, dtype=torch.float64))
    np.testing.assert_allclose(res.x.numpy(), targets.numpy(), atol=1e-9)


def test_nonfinite_start_is_left_alone():
    def f(x, rows):
        v = (x * x).sum(-1)
        v = torch.where(x[:, 0] > 100, torch.full_like(v, float("nan")), v)
        return v, 2 * x

    res = minimize(f, torch.tensor([[1e3, 0.0], [1.0, 2.0]], dtype=torch.float64))
    assert not res.moved[0] and not res.converged[0]
    assert res.x[1].abs().max() < 1e-9


def test_box_bounds_hold_and_the_free_coordinates_still_converge():
    """min (x - 3)^2 + (y + 2)^2 on [0, 1] x [-5, 5]: x stops on its upper bound, y reaches -2; a start
    outside the box is projected in first."""
    def f(x, rows):
        t = torch.tensor([3.0, -2.0], dtype=x.dtype)
        return ((x - t) ** 2).sum(-1), 2 * (x - t)

    x0 = torch.tensor([[0.5, 4.0], [7.0, -9.0]], dtype=torch.float64)
    res = minimize(f, x0, bounds=([0.0, -5.0], [1.0, 5.0]))
    np.testing.assert_allclose(res.x.numpy(), [[1.0, -2.0], [1.0, -2.0]], atol=1e-9)
    assert res.converged.all()
    # inside the box the bounded and unbounded runs agree exactly
    free = minimize(_rosen, torch.tensor([[-1.2, 1.0]], dtype=torch.float64))
    boxed = minimize(_rosen, torch.tensor([[-1.2, 1.0]], dtype=torch.float64), bounds=([-5.0, -5.0], [5.0, 5.0]))
    np.testing.assert_allclose(boxed.x.numpy(), free.x.numpy(), atol=1e-10)
