"""Power-function EMA of Karras et al. 2024 (EDM2), several widths tracked at once.

The average at training time t (counted in samples) is the integral of the weights theta(tau) against the
power-function profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. Its discrete form is an
EMA with a time-dependent decay; one step of batch_size samples ending at cur_nimg uses

    beta = (1 - batch_size / cur_nimg) ^ (gamma + 1)                                    (1)
    ema  <- beta ema + (1 - beta) theta                                                 (2)

(beta = 0 on the first step, so the average starts from the weights). The width is set by the profile's
relative standard deviation: for tau / t ~ density (gamma + 1) x^gamma on [0, 1],

    std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))                                   (3)

which rearranges to the cubic  g^3 + 7 g^2 + (16 - std^-2) g + (12 - std^-2) = 0.     (4)

For 0 < std < 1/sqrt(12) (the gamma -> 0 limit) (4) has exactly one root > 0; we take the largest real root
from numpy.roots. Averages are kept in float32 whatever the model's dtype; buffers are copied, not averaged.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def std_to_gamma(std: float) -> float:
    """Exponent gamma of the power-function profile with relative width std: largest real root of (4)."""
    if not 0 < std < 12 ** -0.5:
        raise ValueError(f"EMA std={std} must be in (0, 1/sqrt(12) ~ 0.2887)")
    s = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = roots.real[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots))]
    return float(real.max())


def gamma_to_std(gamma: float) -> float:
    """Relative width (3) of the power-function profile with exponent gamma."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def std_key(std: float) -> str:
    """State-dict key of one width, e.g. 0.01 -> "0.0100"."""
    return f"{float(std):.4f}"


def _persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Buffers that belong to the state dict (non-persistent ones, e.g. fixed position tables, are rebuilt)."""
    keys = set(model.state_dict().keys())
    return {n: b for n, b in model.named_buffers() if n in keys}


class PowerFunctionEMA:
    """EDM2 power-function EMA of `model`'s parameters for each std in `stds` (pass the unwrapped module)."""

    def __init__(self, model: nn.Module, stds: tuple[float, ...] | list[float] = (0.01, 0.05)):
        keys = [std_key(s) for s in stds]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"EMA stds={list(stds)} must be non-empty and distinct at 4 decimals")
        self.stds = [float(s) for s in stds]
        self.gammas = {std_key(s): std_to_gamma(s) for s in self.stds}
        self.ema: dict[str, dict[str, Tensor]] = {k: self._snapshot(model) for k in keys}

    @staticmethod
    def _snapshot(model: nn.Module) -> dict[str, Tensor]:
        """A float32 copy of the parameters and a copy of the buffers (floating buffers also as float32)."""
        out = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        for n, b in _persistent_buffers(model).items():
            out[n] = b.detach().float().clone() if b.is_floating_point() else b.detach().clone()
        return out

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch_size: int) -> None:
        """Fold in the weights after the step that brought the sample count to cur_nimg (1), (2)."""
        if batch_size <= 0 or cur_nimg < batch_size:
            raise ValueError(f"EMA update needs 0 < batch_size <= cur_nimg, got batch_size={batch_size}, "
                             f"cur_nimg={cur_nimg}")
        params = dict(model.named_parameters())
        buffers = _persistent_buffers(model)
        for key, avg in self.ema.items():
            beta = (1.0 - batch_size / cur_nimg) ** (self.gammas[key] + 1.0)
            for name, p in params.items():
                avg[name].lerp_(p.detach().float(), 1.0 - beta)  # ema + (1 - beta)(theta - ema)
            for name, b in buffers.items():
                avg[name].copy_(b.detach())

    def averaged(self, std: float) -> dict[str, Tensor]:
        """A state dict (float32 parameters, copied buffers) of the average with width std."""
        key = std_key(std)
        if key not in self.ema:
            raise KeyError(f"EMA std={std} is not tracked (tracked: {sorted(self.ema)})")
        return {n: t.clone() for n, t in self.ema[key].items()}

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """{std key: {name: tensor}}: tensors only, loadable with torch.load(weights_only=True)."""
        return {k: {n: t.clone() for n, t in avg.items()} for k, avg in self.ema.items()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Restore averages; the tracked stds, names and shapes must match exactly."""
        if sorted(state) != sorted(self.ema):
            raise ValueError(f"EMA state has stds {sorted(state)}, this EMA tracks {sorted(self.ema)}")
        for key, avg in self.ema.items():
            got = state[key]
            if sorted(got) != sorted(avg):
                missing, extra = sorted(set(avg) - set(got)), sorted(set(got) - set(avg))
                raise ValueError(f"EMA state for std {key}: missing {missing[:5]}, unexpected {extra[:5]}")
            for name, t in avg.items():
                if got[name].shape != t.shape:
                    raise ValueError(f"EMA state for std {key}: {name} has shape {tuple(got[name].shape)}, "
                                     f"expected {tuple(t.shape)}")
                t.copy_(got[name])
