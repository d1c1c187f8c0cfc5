"""On-device image transforms shared by the trainer, evaluation and both loader backends.

Encoding (paper): uint8 [0, 255] -> float [-1, 1] by x / 127.5 - 1; decoding x * 127.5 + 128, clipped to uint8
(+128 as in the paper's code: for an undequantised image it recovers the level exactly under truncation; on
dequantised values k/127.5 - 1 + U[0,1)/128 it gives k + 1 about half the time, a bias of half a level that we
keep for parity with the published numbers). Augmentation (paper): random horizontal
and vertical flips per sample, then uniform dequantisation x + U[0, 1) / 128 (one grey level is 2/255 ~ 1/128 wide
on [-1, 1]). All randomness comes from a caller-owned torch.Generator, so a resumed trainer reproduces it.
"""
from __future__ import annotations

import torch


def encode(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images (any layout) -> float in [-1, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"encode expects uint8 images, got {x.dtype}")
    return x.to(dtype) / 127.5 - 1.0


def decode(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8 (clip(x * 127.5 + 128, 0, 255), truncated)."""
    return (x.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def augment(x: torch.Tensor, generator: torch.Generator | None = None, hflip: bool = True, vflip: bool = True,
            dequantize: bool = True) -> torch.Tensor:
    """Random per-sample flips of (B, C, H, W) then x + U[0, 1)/128. Draws come from `generator` on x's device.

    The draws are made in a fixed order (hflip mask, vflip mask, dequantisation noise) and always made, whatever
    the flags, so that switching one augmentation off does not shift the random stream of the others.
    """
    b = x.shape[0]
    dev = generator.device if generator is not None else x.device
    hmask = torch.rand(b, generator=generator, device=dev).to(x.device) < 0.5
    vmask = torch.rand(b, generator=generator, device=dev).to(x.device) < 0.5
    noise = torch.rand(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device)
    if hflip:
        x = torch.where(hmask[:, None, None, None], x.flip(-1), x)
    if vflip:
        x = torch.where(vmask[:, None, None, None], x.flip(-2), x)
    if dequantize:
        x = x + noise.to(x.dtype) / 128.0
    return x
