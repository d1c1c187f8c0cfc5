"""Classifier-free guidance for flow models.

v_w(x, t | y) = v(x, t | y_null) + w (v(x, t | y) - v(x, t | y_null))                 (1)

y_null is y with the chosen condition groups replaced by the model's null index (by default only the
perturbation; experiment and cell type stay conditional, as in MiT). w = 1 is the plain conditional model
(one forward), w = 0 the null-conditioned model (one forward); otherwise both branches run in one batched
forward of size 2B.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def guided_velocity(model: Any, x: Tensor, t: Tensor, labels: dict[str, Tensor], w: float,
                    groups: Sequence[str] = ("perturbation",)) -> Tensor:
    """Guided velocity (1). model(x, t (B,), labels) -> v; model.null_labels(labels, groups) -> nulled copy."""
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if w == 1:
        return model(x, t, labels)
    null = model.null_labels(labels, tuple(groups))
    if w == 0:
        return model(x, t, null)
    # One forward on [cond; null] of size 2B.
    both = {k: torch.cat([labels[k], null[k]]) for k in labels}
    v_cond, v_null = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return v_null + w * (v_cond - v_null)


def make_velocity_fn(model: Any, labels: dict[str, Tensor], w: float,
                     groups: Sequence[str] = ("perturbation",)) -> Callable[[Tensor, Tensor], Tensor]:
    """Closure velocity_fn(t, x) for phenoflow.flow.solvers.integrate with fixed labels and guidance w."""
    groups = tuple(groups)

    def velocity_fn(t: Tensor, x: Tensor) -> Tensor:
        return guided_velocity(model, x, t, labels, w, groups)

    return velocity_fn
