"""6 -> 3 channel projection of cell-painting images for viewing and for RGB feature networks.

The default mapping is the one of the CellFlux code (ARCHITECTURE.md section 3). On data in [-1, 1], channel c
contributes `weights[c] = (R, G, B)` to the colour image:

    ch1 -> (0, 0, 1)    ch2 -> (0, 1, 0)    ch3 -> (1, 0, 0)
    ch4 -> (0, .5, .5)  ch5 -> (.5, 0, .5)  ch6 -> (.5, .5, 0)

then rgb = clamp(sum_c x_c weights[c], -1, 1) and the result is mapped to [0, 1] by (rgb + 1) / 2.
3-channel input is already RGB: it is only clamped and mapped to [0, 1].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# Rows: input channels 1..6; columns: (R, G, B).
DEFAULT_WEIGHTS: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 1.0),
    (0.0, 1.0, 0.0),
    (1.0, 0.0, 0.0),
    (0.0, 0.5, 0.5),
    (0.5, 0.0, 0.5),
    (0.5, 0.5, 0.0),
)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the batch encoding x / 127.5 - 1); float input is returned as is."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x


def project_to_rgb(x: torch.Tensor, weights: Sequence[Sequence[float]] | torch.Tensor | None = None) -> torch.Tensor:
    """Project (B, C, H, W) images on [-1, 1] (or uint8) to RGB (B, 3, H, W) float on [0, 1].

    weights: (C, 3) matrix, row c = the (R, G, B) contribution of channel c; default DEFAULT_WEIGHTS for C = 6.
    With C = 3 and no weights the image passes through (clamped and mapped to [0, 1]).
    """
    if x.ndim != 4:
        raise ValueError(f"project_to_rgb expects (B, C, H, W) images, got shape {tuple(x.shape)}")
    x = to_unit_range(x)
    c = x.shape[1]
    if weights is None:
        if c == 3:
            return (x.clamp(-1, 1) + 1) / 2
        if c != 6:
            raise ValueError(f"project_to_rgb: no default projection for {c} channels (give weights of shape ({c}, 3))")
        weights = DEFAULT_WEIGHTS
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    if w.shape != (c, 3):
        raise ValueError(f"project_to_rgb: weights have shape {tuple(w.shape)}, expected ({c}, 3) for {c} channels")
    rgb = torch.einsum("bchw,cr->brhw", x, w)  # rgb[r] = sum_c x_c w[c, r]
    return (rgb.clamp(-1, 1) + 1) / 2  # clamp to [-1, 1], then map to [0, 1]


def to_uint8_rgb(x: torch.Tensor, weights=None) -> torch.Tensor:
    """Projected images as uint8 (B, H, W, 3) for saving as PNG."""
    rgb = project_to_rgb(x, weights)
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
