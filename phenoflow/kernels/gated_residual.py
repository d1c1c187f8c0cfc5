"""Fused gated residual with projection dropout: out = x + gate * dropout(y, p).

x, y (B, N, D) (residual stream and branch output), gate (B, D) per sample. fp32 arithmetic throughout.

Dropout, without storing a mask, for the flat element index i = (b * N + n) * D + d (int64):
    u(i)  = uniform[0, 1)( word (i mod 4) of Philox4x32-7(key = seed, counter = i div 4) )
    keep  = u(i) >= p,        drop(y) = y * keep / (1 - p)
One Philox call yields four 32-bit words, so when D % 4 == 0 a tile makes one call per four columns and
interleaves the words (an estimate, not yet measured: Philox is about 100 integer ops per call, so one
call per element would make the kernel compute-bound on H100, one per four should keep it under the
memory time; bench_gated_residual.py measures p = 0.1 against p = 0). Otherwise each element picks its word
from its own call: the same mask, only slower. 7 rounds: Philox4x32-7 passes TestU01's BigCrush (Salmon et
al., SC 2011); 10 is the conservative library default. The backward kernel regenerates `keep` from
(seed, i), so nothing but the seed (one int64 on the device) is saved for it. With p = 0 the kernels are
specialised (constexpr) to a path with no random numbers.
Backward, with m = keep / (1 - p):
    dx = dout            dy = dout * gate * m            dgate = sum_n dout * y * m   (two-stage reduction)
y is saved for dgate (eager PyTorch saves the dropout output and a mask instead).

Seeds: `gated_residual` draws the seed with `torch.randint` on x's device from torch's default generator (or
the `generator` given), so `torch.manual_seed(...)` at the start of a training step (the trainer seeds
per step from (seed, rank, samples seen)) makes the masks reproducible, and a resumed run redraws the same
masks. The seed is a device tensor, read inside the kernel: no host synchronisation, and torch.compile traces
the draw as an ordinary random op. (Inductor generates its own random numbers for compiled random ops, so a
compiled and an eager run of the same step draw different, equally valid seeds, unless
torch._inductor.config.fallback_random is set.) The mask for a given
seed is a function of (seed, element index) only: it does not depend on tile sizes or the GPU.

Layers: Triton kernels -> launchers -> torch.library custom ops (+ fake, + register_autograd) ->
`gated_residual`. `gated_residual_reference` is the fp32 reference (it takes the keep mask explicitly).
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

PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _uniform(seed, tok, cols, D, VEC4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """u(i) in [0, 1) for the (BLOCK_M, BLOCK_D) tile of flat indices i = tok * D + cols (see module doc)."""
    if VEC4:
        # D % 4 == 0: counters tok * D/4 + j for the BLOCK_D/4 column groups, four words each, interleaved
        # so that column 4j + k gets word k.
        ctr = tok[:, None] * (D // 4) + tl.arange(0, BLOCK_D // 4)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, ctr, PHILOX_ROUNDS)
        r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    else:
        offs = tok[:, None] * D + cols[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, offs // 4, PHILOX_ROUNDS)
        w = offs % 4
        r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return tl.uint_to_uniform_float(r)


@triton.jit
def _fwd_kernel(X, Y, GATE, SEED, OUT, N, D, stride_gate, p, scale,
                HAS_DROPOUT: tl.constexpr, VEC4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, b = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < N)[:, None] & cmask[None, :]
    tok = b.to(tl.int64) * N + rows
    offs = tok[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        # keep with probability 1 - p; kept values scaled by 1 / (1 - p).
        seed = tl.load(SEED)
        keep = _uniform(seed, tok, cols, D, VEC4, BLOCK_M, BLOCK_D) >= p
        y = tl.where(keep, y * scale, 0.0)
    out = x + gate[None, :] * y
    tl.store(OUT + offs, to_out(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DOUT, Y, GATE, SEED, DY, DGATE_PART, N, D, G, stride_gate, p, scale,
                HAS_DROPOUT: tl.constexpr, VEC4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (g, b) handles row tiles g, g + G, ... of sample b; partial dgate sums stay in registers.
    g_id, b = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = tl.load(GATE + b * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dgate_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(g_id * BLOCK_M, N, G * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < N)[:, None] & cmask[None, :]
        tok = b.to(tl.int64) * N + rows
        offs = tok[:, None] * D + cols[None, :]
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            # The forward mask, regenerated from (seed, element index).
            keep = _uniform(seed, tok, cols, D, VEC4, BLOCK_M, BLOCK_D) >= p
            dout_m = tl.where(keep, dout * scale, 0.0)
        else:
            dout_m = dout
        dgate_acc += tl.sum(dout_m * y, axis=0)
        tl.store(DY + offs, to_out(dout_m * gate[None, :], DY.dtype.element_ty), mask=mask)
    tl.store(DGATE_PART + (b.to(tl.int64) * G + g_id) * D + cols, dgate_acc, mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers.


def _check(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, p: float) -> None:
    op = "gated_residual"
    if x.ndim != 3 or y.shape != x.shape:
        raise ValueError(f"{op}: x and y must both be (B, N, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if tuple(gate.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"{op}: gate must be (B, D) = {(x.shape[0], x.shape[2])}, got {tuple(gate.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout p={p} must be in [0, 1)")
    for name, t in (("x", x), ("y", y), ("gate", gate)):
        check_float(name, t, op)
    check_device(x, y, gate, op=op)


def _out_dtype(x, y, gate) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))


def gated_residual_forward(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, seed: torch.Tensor | None,
                           p: float, force_scalar_rng: bool = False) -> torch.Tensor:
    """out = x + gate * dropout(y, p); `seed` an int64 tensor of one element on x's device (unused if p = 0).

    `force_scalar_rng` takes the one-call-per-element mask path even when D % 4 == 0 (tests: same mask).
    """
    _check(x, y, gate, p)
    if p > 0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        raise ValueError("gated_residual: p > 0 needs `seed`, an int64 tensor with one element")
    B, N, D = x.shape
    x, y, gate = x.contiguous(), y.contiguous(), row_major(gate)
    out = torch.empty((B, N, D), dtype=_out_dtype(x, y, gate), device=x.device)
    if x.numel() == 0:
        return out
    BLOCK_M, BLOCK_D, warps = row_tile(N, D, live=2)  # two inputs and the random words
    _fwd_kernel[(triton.cdiv(N, BLOCK_M), B)](
        x, y, gate, seed if p > 0 else x, out, N, D, gate.stride(0), p, 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0, VEC4=D % 4 == 0 and not force_scalar_rng, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        num_warps=warps)
    return out


def gated_residual_backward(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, seed: torch.Tensor | None,
                            p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dy, dgate) in the dtypes of y and gate (dx is dout itself)."""
    B, N, D = y.shape
    dout, y, gate = dout.contiguous(), y.contiguous(), row_major(gate)
    dy = torch.empty_like(y)
    if y.numel() == 0:
        return dy, torch.zeros((B, D), dtype=gate.dtype, device=y.device)
    BLOCK_M, BLOCK_D, warps = row_tile(N, D, live=2)  # two inputs and the random words
    G = reduction_programs(N, BLOCK_M, B, y.device)
    dgate_part = torch.empty((B, G, D), dtype=torch.float32, device=y.device)
    _bwd_kernel[(G, B)](
        dout, y, gate, seed if p > 0 else y, dy, dgate_part, N, D, G, gate.stride(0), p, 1.0 / (1.0 - p),
        HAS_DROPOUT=p > 0, VEC4=D % 4 == 0, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps)
    return dy, dgate_part.sum(1).to(gate.dtype)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration.


@torch.library.custom_op("phenoflow::gated_residual_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    return gated_residual_forward(x, y, gate, seed, p)


@_fwd_op.register_fake
def _(x, y, gate, seed, p):
    return x.new_empty(x.shape, dtype=_out_dtype(x, y, gate))


@torch.library.custom_op("phenoflow::gated_residual_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, seed: torch.Tensor | None,
            p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_backward(dout, y, gate, seed, p)


@_bwd_op.register_fake
def _(dout, y, gate, seed, p):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    x, y, gate, seed, p = inputs
    ctx.save_for_backward(y, gate, seed)
    ctx.p, ctx.x_dtype = p, x.dtype


def _backward(ctx, dout):
    y, gate, seed = ctx.saved_tensors
    dy, dgate = _bwd_op(dout, y, gate, seed, ctx.p)
    return dout.to(ctx.x_dtype), dy, dgate, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A dropout seed: one int64 in [0, 2^31 - 1) drawn on `device` from torch's generator (no host sync)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64, generator=generator)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, p: float = 0.0,
                   seed: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """out = x + gate * dropout(y, p) (fused, differentiable). x, y (B, N, D), gate (B, D).

    p > 0 applies dropout whatever the module's mode (the caller passes p = 0 in eval). `seed`: an int64
    tensor of one element; by default drawn from torch's generator on x's device (see the module docstring).
    """
    if p > 0 and seed is None:
        seed = draw_seed(x.device, generator)
    return _fwd_op(x, y, gate, seed if p > 0 else None, float(p))


# ----------------------------------------------------------------------------------------------------------
# fp32 reference and mask inspection.


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, p: float = 0.0,
                             keep: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x + gate * y * keep / (1 - p); keep (B, N, D) bool, None = keep everything."""
    y32 = y.float()
    if keep is not None:
        y32 = y32 * keep / (1.0 - p)
    return x.float() + gate.float()[:, None] * y32


def dropout_keep_mask(seed: torch.Tensor, shape: tuple[int, int, int], p: float,
                      force_scalar_rng: bool = False) -> torch.Tensor:
    """The keep mask the kernels draw for `seed` at p (by running the forward on ones): for tests and debugging."""
    B, _, D = shape
    ones = torch.ones(shape, device=seed.device)
    zeros = torch.zeros(shape, device=seed.device)
    out = gated_residual_forward(zeros, ones, torch.ones((B, D), device=seed.device), seed, p, force_scalar_rng)
    return out != 0
