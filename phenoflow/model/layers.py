"""The memory-bound operations around attention in a MiT block, each with a `kernels` switch.

`kernels="torch"` is the plain-PyTorch reference (eager composite); `kernels="triton"` dispatches to the
fused ops in `phenoflow.kernels` (same maths, fewer passes over memory, no saved normalised tensors).
Both paths take and return the same tensors, so a checkpoint trained on one runs on the other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def rmsnorm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """rmsnorm(x) = x / sqrt(mean(x^2) + eps) over the last axis, no affine weight; computed in fp32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def modulated_rmsnorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """y = rmsnorm(x) * (1 + scale) + shift;  x (B, N, D), shift and scale (B, D) per sample."""
    if kernels == "triton":
        from phenoflow.kernels.modulated_rmsnorm import modulated_rmsnorm as fused

        return fused(x, shift, scale, EPS)
    return rmsnorm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, p: float = 0.0, kernels: str = "torch") -> torch.Tensor:
    """out = x + gate * dropout(y, p);  x, y (B, N, D), gate (B, D). p = 0 in eval mode (the caller decides)."""
    if kernels == "triton":
        from phenoflow.kernels.gated_residual import gated_residual as fused

        return fused(x, y, gate, p)
    if p > 0:
        y = F.dropout(y, p=p, training=True)
    return x + gate.unsqueeze(1) * y


def skip_merge(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               kernels: str = "torch") -> torch.Tensor:
    """Long-skip merge: Linear(2D -> D)(rmsnorm(cat([x, skip], -1)));  weight (D, 2D)."""
    if kernels == "triton":
        from phenoflow.kernels.skip_merge import skip_merge as fused

        return fused(x, skip, weight, bias, EPS)
    return F.linear(rmsnorm(torch.cat([x, skip], dim=-1)), weight, bias)


def attention(qkv: torch.Tensor, num_heads: int, backend: str = "auto", kernels: str = "torch") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head. qkv (B, N, 3D) as the qkv Linear writes it -> (B, N, D).

    `backend`: sdpa or auto (torch's scaled_dot_product_attention, which picks its flash, cuDNN or
    memory-efficient kernel), flash_attn (the flash-attn package), math (explicit fp32 softmax). With
    kernels="triton", `phenoflow.kernels.attention` decides, and "auto" there prefers flash-attn when installed.
    """
    if kernels == "triton" or backend == "flash_attn":
        from phenoflow.kernels.attention import attention as attn

        return attn(qkv, num_heads, backend=backend)
    B, N, three_d = qkv.shape
    D = three_d // 3
    q, k, v = qkv.view(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
    if backend == "math":
        w = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        o = (w.softmax(-1) @ v.float()).to(qkv.dtype)
    else:
        o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(B, N, D)
