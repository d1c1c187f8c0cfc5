"""Fused modulated RMSNorm (adaLN): y = rmsnorm(x) * (1 + scale) + shift.

x (B, N, D) tokens, shift and scale (B, D) per sample (broadcast over the N tokens); rmsnorm has no affine
weight. All arithmetic is in fp32 whatever the input dtype (fp32, bf16, fp16).

Forward, per token row:
    rstd = 1 / sqrt(mean_d(x^2) + eps)                     (saved for backward: one fp32 per token)
    y    = x * rstd * (1 + scale) + shift
Backward, with xhat = x * rstd (recomputed, never stored) and g = dy * (1 + scale):
    dshift = sum_n dy                                       (two stages: per-program partials, then a sum)
    dscale = sum_n dy * xhat
    dx     = rstd * (g - xhat * mean_d(g * xhat))
Only x and rstd are kept for the backward pass: no normalised or modulated tensor is saved.

Layers: Triton kernels -> launchers (`modulated_rmsnorm_forward/backward`) -> torch.library custom ops with
fake (meta) implementations and `register_autograd` (torch.library turns the pair into an autograd
function; torch.compile sees a single op, no graph break) -> `modulated_rmsnorm`, the public entry.
`modulated_rmsnorm_reference` is the fp32 reference the tests compare against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from phenoflow.kernels._utils import (
    check_device,
    check_float,
    reduction_programs,
    row_major,
    row_tile,
    to_out,
)

# ----------------------------------------------------------------------------------------------------------
# Triton kernels.


@triton.jit
def _fwd_kernel(X, SHIFT, SCALE, Y, RSTD, N, D, stride_shift, stride_scale, eps,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: BLOCK_M consecutive tokens of one sample b (so shift/scale are loaded once).
    pid_m, b = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask, cmask = rows < N, cols < D
    mask = rmask[:, None] & cmask[None, :]
    tok = b.to(tl.int64) * N + rows  # flat token index, int64 so B*N*D may pass 2^31
    offs = tok[:, None] * D + cols[None, :]
    # Convert right after the load: the interpreter computes bf16 arithmetic wrongly.
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * stride_shift + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    # rstd = 1 / sqrt(mean(x^2) + eps) per token (masked columns are 0 and do not count).
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(Y + offs, to_out(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + tok, rstd, mask=rmask)


@triton.jit
def _bwd_kernel(DY, X, SCALE, RSTD, DX, DSCALE_PART, DSHIFT_PART, N, D, G, stride_scale,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (g, b) loops over row tiles g, g + G, g + 2G, ... of sample b, writes dx for each tile and
    # keeps the partial column sums of dscale and dshift in registers (first stage of the reduction).
    g_id, b = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale = tl.load(SCALE + b * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    dscale_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(g_id * BLOCK_M, N, G * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        tok = b.to(tl.int64) * N + rows
        offs = tok[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tok, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        dshift_acc += tl.sum(dy, axis=0)
        dscale_acc += tl.sum(dy * xhat, axis=0)
        # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * (1 + scale).
        gm = dy * (1.0 + scale[None, :])
        c = tl.sum(gm * xhat, axis=1) / D
        dx = (gm - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + offs, to_out(dx, DX.dtype.element_ty), mask=mask)
    part = (b.to(tl.int64) * G + g_id) * D + cols
    tl.store(DSCALE_PART + part, dscale_acc, mask=cmask)
    tl.store(DSHIFT_PART + part, dshift_acc, mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers.


def _check(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    op = "modulated_rmsnorm"
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, _, D = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if tuple(t.shape) != (B, D):
            raise ValueError(f"{op}: {name} must be (B, D) = {(B, D)}, got {tuple(t.shape)}")
        check_float(name, t, op)
    check_float("x", x, op)
    check_device(x, shift, scale, op=op)


def modulated_rmsnorm_forward(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                              eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y, rstd): y (B, N, D) in the promoted dtype of x, shift, scale; rstd (B, N) fp32."""
    _check(x, shift, scale)
    B, N, D = x.shape
    x, shift, scale = x.contiguous(), row_major(shift), row_major(scale)
    y = torch.empty((B, N, D), dtype=torch.promote_types(x.dtype, torch.promote_types(shift.dtype, scale.dtype)),
                    device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, rstd
    BLOCK_M, BLOCK_D, warps = row_tile(N, D)
    _fwd_kernel[(triton.cdiv(N, BLOCK_M), B)](
        x, shift, scale, y, rstd, N, D, shift.stride(0), scale.stride(0), eps,
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps)
    return y, rstd


def modulated_rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor,
                               shift_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dscale, dshift) in the dtypes of x, scale and shift."""
    B, N, D = x.shape
    dy, x, scale = dy.contiguous(), x.contiguous(), row_major(scale)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        z = torch.zeros((B, D), dtype=torch.float32, device=x.device)
        return dx, z.to(scale.dtype), z.to(shift_dtype)
    BLOCK_M, BLOCK_D, warps = row_tile(N, D, live=2)  # x and dy
    G = reduction_programs(N, BLOCK_M, B, x.device)
    dscale_part = torch.empty((B, G, D), dtype=torch.float32, device=x.device)
    dshift_part = torch.empty((B, G, D), dtype=torch.float32, device=x.device)
    _bwd_kernel[(G, B)](
        dy, x, scale, rstd, dx, dscale_part, dshift_part, N, D, G, scale.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps)
    # Second stage of the reduction over tokens: sum the G fp32 partials of each sample.
    return dx, dscale_part.sum(1).to(scale.dtype), dshift_part.sum(1).to(shift_dtype)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration: custom ops (opaque to torch.compile, traced through via their fake
# implementations) and the autograd formula linking forward and backward.


@torch.library.custom_op("phenoflow::modulated_rmsnorm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return modulated_rmsnorm_forward(x, shift, scale, eps)


@_fwd_op.register_fake
def _(x, shift, scale, eps):
    dtype = torch.promote_types(x.dtype, torch.promote_types(shift.dtype, scale.dtype))
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("phenoflow::modulated_rmsnorm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor,
            shift_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulated_rmsnorm_backward(dy, x, scale, rstd, shift_dtype)


@_bwd_op.register_fake
def _(dy, x, scale, rstd, shift_dtype):
    B, _, D = x.shape
    return (x.new_empty(x.shape), x.new_empty((B, D), dtype=scale.dtype),
            x.new_empty((B, D), dtype=shift_dtype))


def _setup_context(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, scale, rstd)
    ctx.shift_dtype = shift.dtype


def _backward(ctx, dy, _drstd):
    x, scale, rstd = ctx.saved_tensors
    dx, dscale, dshift = _bwd_op(dy, x, scale, rstd, ctx.shift_dtype)
    return dx, dshift, dscale, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def modulated_rmsnorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = rmsnorm(x) * (1 + scale) + shift (fused, differentiable); x (B, N, D), shift/scale (B, D)."""
    return _fwd_op(x, shift, scale, eps)[0]


# ----------------------------------------------------------------------------------------------------------
# fp32 reference.


def modulated_rmsnorm_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float = 1e-6) -> torch.Tensor:
    """The same maths in fp32 with plain torch ops (the tests' ground truth)."""
    x32 = x.float()
    xhat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return xhat * (1 + scale.float()[:, None]) + shift.float()[:, None]
