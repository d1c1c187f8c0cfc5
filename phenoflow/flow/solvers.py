"""ODE solvers for sampling: dx/dt = v(t, x) from t0 to t1 (forwards or backwards), counting evaluations.

velocity_fn(t, x) always receives t as a (B,) tensor on x's device, in x's dtype promoted to at least float32. The number of function
evaluations (NFE) is counted by wrapping velocity_fn, so it is exact for every method:
- dopri5: torchdiffeq's adaptive Dormand-Prince 5(4), error control with rtol/atol (includes the
  evaluations of its initial step-size selection);
- euler:  x_{k+1} = x_k + h v(t_k, x_k)                                    NFE = steps
- heun:   x~ = x_k + h v(t_k, x_k);  x_{k+1} = x_k + h/2 (v(t_k, x_k) + v(t_{k+1}, x~))
          NFE = 2 * steps (the last corrector is never skipped: v is regular at t = 1 for flows).
Backwards integration (t1 < t0, image -> noise) uses the same formulas with h < 0.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

VelocityFn = Callable[[Tensor, Tensor], Tensor]
METHODS = ("dopri5", "heun", "euler")


def integrate(velocity_fn: VelocityFn, x: Tensor, t0: float = 0.0, t1: float = 1.0, method: str = "dopri5",
              rtol: float = 1e-5, atol: float = 1e-5, steps: int = 50) -> tuple[Tensor, int]:
    """Solve dx/dt = velocity_fn(t, x) from x(t0) = x to t1. Returns (x(t1), NFE)."""
    if method not in METHODS:
        raise ValueError(f"solver method={method!r} is not one of {list(METHODS)}")
    if method != "dopri5" and steps < 1:
        raise ValueError(f"solver steps={steps} must be >= 1")
    nfe = 0
    tdtype = torch.promote_types(x.dtype, torch.float32)  # never hand bf16 times to the model

    def f(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return velocity_fn(t.to(tdtype).expand(y.shape[0]), y)

    if t0 == t1:
        return x, 0
    if method == "dopri5":
        ts = torch.tensor([t0, t1], dtype=tdtype, device=x.device)
        return odeint(f, x, ts, method="dopri5", rtol=rtol, atol=atol)[-1], nfe

    # Fixed uniform grid, built in float64 so that the end point is exactly t1.
    grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    for k in range(steps):
        ta, tb = grid[k].to(x.device), grid[k + 1].to(x.device)
        h = float(grid[k + 1] - grid[k])
        v = f(ta, x)
        if method == "euler":
            x = x + h * v
        else:  # heun: Euler predictor, trapezoidal corrector
            x_pred = x + h * v
            x = x + (0.5 * h) * (v + f(tb, x_pred))
    return x, nfe


def counterfactual(velocity_fn_source: VelocityFn, velocity_fn_target: VelocityFn, x_image: Tensor,
                   method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                   steps: int = 50) -> tuple[Tensor, int]:
    """Counterfactual sampling: invert x_image to its noise under the source conditioning (t: 1 -> 0), then
    generate from that noise under the target conditioning (t: 0 -> 1). Returns (x_counterfactual, total NFE)."""
    noise, nfe_back = integrate(velocity_fn_source, x_image, 1.0, 0.0, method, rtol, atol, steps)
    x_cf, nfe_fwd = integrate(velocity_fn_target, noise, 0.0, 1.0, method, rtol, atol, steps)
    return x_cf, nfe_back + nfe_fwd
