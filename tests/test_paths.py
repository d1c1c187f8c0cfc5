"""Probability paths against closed forms and finite differences; time samplers' ranges and moments."""
import math
from types import SimpleNamespace

import pytest
import torch

from phenoflow.flow.paths import (
    BrownianBridgePath,
    LinearPath,
    VPPath,
    build_path,
    build_time_sampler,
    sample_time,
)


def _pair(shape=(4, 3, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


T = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64)


def test_linear_closed_form():
    x0, x1 = _pair()
    x_t, u = LinearPath().sample(x0, x1, T)
    for i, t in enumerate(T.tolist()):
        torch.testing.assert_close(x_t[i], t * x1[i] + (1 - t) * x0[i])
    torch.testing.assert_close(u, x1 - x0)
    torch.testing.assert_close(x_t[0], x0[0])  # t = 0 is the source, t = 1 the data
    torch.testing.assert_close(x_t[3], x1[3])


def test_vp_closed_form():
    x0, x1 = _pair()
    x_t, u = VPPath().sample(x0, x1, T)
    for i, t in enumerate(T.tolist()):
        a = math.pi * t / 2
        torch.testing.assert_close(x_t[i], math.sin(a) * x1[i] + math.cos(a) * x0[i])
        torch.testing.assert_close(u[i], math.pi / 2 * (math.cos(a) * x1[i] - math.sin(a) * x0[i]))
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[3], x1[3])


def test_bridge_closed_form():
    x0, x1 = _pair()
    eps = torch.randn_like(x0)
    sigma = 0.3
    t = torch.tensor([0.1, 0.25, 0.6, 0.9], dtype=torch.float64)
    x_t, u = BrownianBridgePath(sigma).sample(x0, x1, t, eps=eps)
    for i, ti in enumerate(t.tolist()):
        s = math.sqrt(ti * (1 - ti))
        torch.testing.assert_close(x_t[i], ti * x1[i] + (1 - ti) * x0[i] + sigma * s * eps[i])
        torch.testing.assert_close(u[i], x1[i] - x0[i] + sigma * (1 - 2 * ti) / (2 * s) * eps[i])


def test_bridge_clamps_endpoints_and_draws_noise():
    x0, x1 = _pair((3, 7))
    path = BrownianBridgePath(0.5, t_eps=1e-3)
    x_t, u = path.sample(x0, x1, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64),
                         generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(u).all() and torch.isfinite(x_t).all()
    # At t = 0.5 the noise term in u vanishes; at the clamped ends it is bounded by sigma / (2 sqrt(t_eps)).
    torch.testing.assert_close(u[1], x1[1] - x0[1])
    assert (u[0] - (x1[0] - x0[0])).abs().max() > 0
    # Same generator seed -> same noise.
    x_t2, _ = path.sample(x0, x1, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64),
                          generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_t, x_t2)


@pytest.mark.parametrize("path", [LinearPath(), VPPath(), BrownianBridgePath(0.4)], ids=["linear", "vp", "bridge"])
def test_target_is_time_derivative(path):
    """Central finite differences of x_t in t (fixed x0, x1, eps) equal the velocity target."""
    x0, x1 = _pair((5, 2, 3))
    eps = torch.randn_like(x0)
    t = torch.tensor([0.05, 0.3, 0.5, 0.71, 0.95], dtype=torch.float64)
    h = 1e-6
    xp, _ = path.sample(x0, x1, t + h, eps=eps)
    xm, _ = path.sample(x0, x1, t - h, eps=eps)
    _, u = path.sample(x0, x1, t, eps=eps)
    torch.testing.assert_close((xp - xm) / (2 * h), u, rtol=1e-6, atol=1e-6)


def test_rank_agnostic_and_shape_errors():
    x0, x1 = _pair((6, 11))  # (B, G) expression vectors
    x_t, u = LinearPath().sample(x0, x1, torch.full((6,), 0.5, dtype=torch.float64))
    assert x_t.shape == u.shape == (6, 11)
    with pytest.raises(ValueError, match="t must have shape"):
        LinearPath().sample(x0, x1, torch.rand(5))


def test_build_path():
    assert isinstance(build_path(SimpleNamespace(path="linear", bridge_sigma=0.1)), LinearPath)
    assert isinstance(build_path(SimpleNamespace(path="vp", bridge_sigma=0.1)), VPPath)
    b = build_path(SimpleNamespace(path="bridge", bridge_sigma=0.7))
    assert isinstance(b, BrownianBridgePath) and b.sigma == 0.7
    with pytest.raises(ValueError, match="flow.path='spline'"):
        build_path(SimpleNamespace(path="spline", bridge_sigma=0.1))


def test_uniform_time_sampler():
    t = sample_time(200_000, "uniform", torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005 and abs(t.var().item() - 1 / 12) < 0.002


def test_logit_normal_time_sampler():
    t = sample_time(200_000, "logit_normal", torch.Generator().manual_seed(0), mean=0.5, std=0.8).double()
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01


def test_time_sampler_determinism_and_errors():
    a = sample_time(8, "logit_normal", torch.Generator().manual_seed(3))
    b = sample_time(8, "logit_normal", torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="beta"):
        sample_time(4, "beta")
    with pytest.raises(ValueError, match="std"):
        sample_time(4, "logit_normal", std=0.0)
    cfg = SimpleNamespace(time_sampler="logit_normal", logit_mean=0.0, logit_std=1.0)
    torch.testing.assert_close(build_time_sampler(cfg)(8, torch.Generator().manual_seed(3)), a)
