"""ODE solvers on analytic velocity fields: accuracy, convergence order, round trips, exact NFE counts."""
import itertools
import math

import pytest
import torch

from phenoflow.flow.solvers import counterfactual, integrate

X0 = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.3, 0.0]], dtype=torch.float64)


def quad(t, x):  # dx/dt = 3 t^2  ->  x(1) = x(0) + 1
    return (3 * t**2).view(-1, 1).expand_as(x)


def linear(a):  # dx/dt = a x  ->  x(1) = x(0) e^a
    return lambda t, x: a * x


def rotation(t, x):  # dx/dt = J x, J = [[0, -1], [1, 0]]  ->  x(1) = R(1) x(0)
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


def rot_exact(x, angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]], dim=1)


CASES = {
    "quad": (quad, lambda x: x + 1),
    "linear": (linear(0.7), lambda x: x * math.exp(0.7)),
    "rotation": (rotation, lambda x: rot_exact(x, 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dopri5_within_tolerance(case):
    fn, exact = CASES[case]
    x1, nfe = integrate(fn, X0, method="dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(x1, exact(X0), rtol=1e-5, atol=1e-5)
    assert nfe > 0


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("case", ["linear", "rotation", "quad"])
def test_fixed_step_convergence_order(method, order, case):
    fn, exact = CASES[case]
    errs = [(integrate(fn, X0, method=method, steps=n)[0] - exact(X0)).abs().max().item() for n in (10, 20, 40)]
    for coarse, fine in itertools.pairwise(errs):
        ratio = coarse / fine
        assert 2**order * 0.8 < ratio < 2**order * 1.25, (errs, ratio)


def test_heun_is_exact_for_linear_in_t():
    # Trapezoidal rule integrates dx/dt = 2t exactly; Euler does not.
    fn = lambda t, x: (2 * t).view(-1, 1).expand_as(x)
    torch.testing.assert_close(integrate(fn, X0, method="heun", steps=3)[0], X0 + 1)
    assert (integrate(fn, X0, method="euler", steps=3)[0] - (X0 + 1)).abs().max() > 0.1


@pytest.mark.parametrize("method,steps,expected", [("euler", 7, 7), ("heun", 7, 14), ("heun", 1, 2)])
def test_nfe_counted_exactly(method, steps, expected):
    calls = []

    def fn(t, x):
        calls.append(t.clone())
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        return -x

    _, nfe = integrate(fn, X0, method=method, steps=steps)
    assert nfe == expected == len(calls)
    assert calls[0][0].item() == 0.0


def test_dopri5_nfe_equals_calls_and_t_shape():
    calls = []

    def fn(t, x):
        assert t.shape == (x.shape[0],)
        calls.append(1)
        return rotation(t, x)

    _, nfe = integrate(fn, X0, method="dopri5")
    assert nfe == len(calls) > 6


@pytest.mark.parametrize("method,tol", [("dopri5", 1e-5), ("heun", 1e-4), ("euler", 2e-2)])
def test_backward_integration_and_round_trip(method, tol):
    fn = linear(0.7)
    back, _ = integrate(fn, X0 * math.exp(0.7), 1.0, 0.0, method=method, steps=200)
    torch.testing.assert_close(back, X0, rtol=tol, atol=tol)
    fwd, _ = integrate(rotation, X0, 0.0, 1.0, method=method, steps=200)
    rt, _ = integrate(rotation, fwd, 1.0, 0.0, method=method, steps=200)
    torch.testing.assert_close(rt, X0, rtol=tol, atol=tol)


def test_backward_time_runs_downwards():
    ts = []
    integrate(lambda t, x: (ts.append(t[0].item()), x)[1], X0, 1.0, 0.0, method="euler", steps=4)
    assert ts == [1.0, 0.75, 0.5, 0.25]
    x0, _ = integrate(quad, X0, 1.0, 0.0, method="dopri5")
    torch.testing.assert_close(x0, X0 - 1, rtol=1e-5, atol=1e-5)


def test_counterfactual_inverts_then_regenerates():
    # Source field: rotation; target field: dx/dt = 3t^2. Back under the rotation undoes R(1), forward adds 1.
    x_img = rot_exact(X0, 1.0)
    x_cf, nfe = counterfactual(rotation, quad, x_img, method="heun", steps=100)
    torch.testing.assert_close(x_cf, X0 + 1, rtol=1e-4, atol=1e-4)
    assert nfe == 400


def test_bad_method():
    with pytest.raises(ValueError, match="rk4"):
        integrate(quad, X0, method="rk4")
    with pytest.raises(ValueError, match="steps=0"):
        integrate(quad, X0, method="euler", steps=0)
