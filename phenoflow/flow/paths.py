"""Probability paths x_t between a source x0 (t = 0, noise or control) and data x1 (t = 1), and time samplers.

Each path gives, for a batch of pairs (x0, x1) and times t of shape (B,), the point x_t on the conditional
path and the regression target u_t = d x_t / d t (the conditional velocity). The model is trained with
plain MSE between v(x_t, t) and u_t. t is broadcast over all trailing dimensions, so images (B, C, H, W)
and expression vectors (B, G) work alike.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """t (B,) -> (B, 1, ..., 1) with x.ndim dimensions, in x's dtype."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


class LinearPath:
    """Rectified flow / conditional OT path (the MiT default).

    x_t = t x1 + (1 - t) x0                                                    (1)
    u_t = d x_t / dt = x1 - x0                                                 (2)
    """

    name = "linear"

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, *, generator: torch.Generator | None = None,
               eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tb = _bcast(t, x1)
        return tb * x1 + (1 - tb) * x0, x1 - x0


class VPPath:
    """Variance-preserving (trigonometric) interpolant: alpha_t^2 + sigma_t^2 = 1.

    x_t = sin(pi t / 2) x1 + cos(pi t / 2) x0                                  (1)
    u_t = (pi / 2) (cos(pi t / 2) x1 - sin(pi t / 2) x0)                       (2)
    """

    name = "vp"

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, *, generator: torch.Generator | None = None,
               eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a = _bcast(t, x1) * (math.pi / 2)
        return torch.sin(a) * x1 + torch.cos(a) * x0, (math.pi / 2) * (torch.cos(a) * x1 - torch.sin(a) * x0)


class BrownianBridgePath:
    """Brownian bridge between x0 and x1 with diffusion sigma (Tong et al. 2023, "SB-CFM").

    x_t = t x1 + (1 - t) x0 + sigma sqrt(t (1 - t)) eps,  eps ~ N(0, I)          (1)

    Target: the conditional flow of the Gaussian bridge N(mu_t, sigma_t^2 I), mu_t = t x1 + (1 - t) x0,
    sigma_t = sigma sqrt(t (1 - t)):  u_t(x) = mu_t' + (sigma_t' / sigma_t) (x - mu_t).  At x = x_t this is

    u_t = x1 - x0 + sigma (1 - 2t) / (2 sqrt(t (1 - t))) eps                   (2)

    i.e. exactly d x_t / dt of (1) for fixed eps. (2) diverges at t = 0 and t = 1, so t is clamped to
    [t_eps, 1 - t_eps] (default 1e-3, the noise coefficient is then at most ~15.8 sigma) for both (1) and (2),
    which keeps each pair (x_t, u_t) consistent. eps is drawn with `generator` unless given.
    """

    name = "bridge"

    def __init__(self, sigma: float = 0.1, t_eps: float = 1e-3):
        if sigma < 0:
            raise ValueError(f"bridge sigma={sigma} must be >= 0")
        if not 0 < t_eps < 0.5:
            raise ValueError(f"bridge t_eps={t_eps} must be in (0, 0.5)")
        self.sigma, self.t_eps = float(sigma), float(t_eps)

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, *, generator: torch.Generator | None = None,
               eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if eps is None:
            dev = generator.device if generator is not None else x1.device
            eps = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype).to(x1.device)
        tb = _bcast(t, x1).clamp(self.t_eps, 1 - self.t_eps)
        s = torch.sqrt(tb * (1 - tb))  # sqrt(t (1 - t))
        x_t = tb * x1 + (1 - tb) * x0 + self.sigma * s * eps
        u_t = x1 - x0 + self.sigma * (1 - 2 * tb) / (2 * s) * eps
        return x_t, u_t


ProbabilityPath = LinearPath | VPPath | BrownianBridgePath


def build_path(flow_cfg: Any) -> ProbabilityPath:
    """FlowConfig -> path object (flow.path = linear | vp | bridge; flow.bridge_sigma for the bridge)."""
    if flow_cfg.path == "linear":
        return LinearPath()
    if flow_cfg.path == "vp":
        return VPPath()
    if flow_cfg.path == "bridge":
        return BrownianBridgePath(flow_cfg.bridge_sigma)
    raise ValueError(f"flow.path={flow_cfg.path!r} is not one of ['linear', 'vp', 'bridge']")


def sample_time(n: int, kind: str = "uniform", generator: torch.Generator | None = None,
                device: torch.device | str | None = None, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """n training times in [0, 1), float32, on `device`.

    uniform:       t ~ U[0, 1)
    logit_normal:  t = sigmoid(mean + std z), z ~ N(0, 1)   (logit(t) ~ N(mean, std^2); SD3's sampler)
    Random numbers are drawn on the generator's device, then moved, so a CPU generator works for CUDA.
    """
    dev = generator.device if generator is not None else device
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=dev)
    elif kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"logit-normal std={std} must be > 0")
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=dev))
    else:
        raise ValueError(f"time sampler {kind!r} is not one of ['uniform', 'logit_normal']")
    return t.to(device) if device is not None else t


def build_time_sampler(flow_cfg: Any):
    """FlowConfig -> f(n, generator, device) -> t (flow.time_sampler, flow.logit_mean, flow.logit_std)."""
    kind, mean, std = flow_cfg.time_sampler, flow_cfg.logit_mean, flow_cfg.logit_std
    sample_time(1, kind, mean=mean, std=std)  # fail now on a bad kind or std

    def sampler(n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
        return sample_time(n, kind, generator, device, mean, std)

    return sampler
