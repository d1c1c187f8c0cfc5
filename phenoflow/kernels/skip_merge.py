"""Fused U-ViT long-skip merge: Linear(2D -> D)(rmsnorm(cat([x, s], -1))), never building the concatenation
or the normalised tensor (ARCHITECTURE.md section 6).

With W = [W1 | W2] (D, 2D) split along its input axis and one rstd per token,
    r   = 1 / sqrt((|x|^2 + |s|^2) / (2D) + eps)                (Triton: one pass over x and s)
    h   = x @ W1^T + s @ W2^T                                    (torch: two GEMMs into one buffer)
    out = h * r + b                                              (Triton epilogue, in place on h)
because rmsnorm(cat) @ W^T = r * (x @ W1^T + s @ W2^T) (r is a per-row scalar).

Backward, with g = dout and gr = g * r (rows scaled):
    db  = sum_tokens g                                           (Triton, fused with gr; two-stage sum)
    dW1 = gr^T @ x,  dW2 = gr^T @ s                              (torch GEMMs, written into one (D, 2D) dW)
    [u | v] = gr @ W                                             (one GEMM, (M, 2D); u, v views)
    c   = x . u + s . v          per token  (= r * dL/dr)
    dx  = u - (r^2 c / 2D) x,    ds = v - (r^2 c / 2D) s         (Triton, one pass)
from dL/dr = sum_j g_j h_j = c / r and dr/dx = -r^3 x / (2D).

Why torch GEMMs by default: at B = 16, N = 2304 (M = 36,864 tokens) the two GEMMs are 2 * M * 2D * D =
196 GFLOP, about 0.3 ms on an H100 at cuBLAS's typical ~650 TFLOP/s for this shape (TMA, wgmma, warp
specialisation); the memory-bound extras (rstd: read x and s, 170 MB; epilogue: read and write h, 170 MB)
take about 0.12 ms at copy bandwidth. A Triton GEMM with the epilogue fused saves the epilogue's 170 MB
(~0.06 ms, ~20% of the GEMM time), so it wins only if it reaches more than about 80% of cuBLAS's
throughput, which plain `tl.dot` matmuls often do not on Hopper. The bf16 `h` is rounded once between the
two GEMMs (cuBLAS reads C in bf16 for beta = 1); accumulation inside each GEMM is fp32. These figures are
estimates, not measurements: the alternative is here too so that a GPU run decides. `_fused_gemm_kernel`
is one Triton GEMM over both halves of K into one fp32 accumulator with the epilogue fused
(module attribute FORWARD_GEMM = "triton"; benchmarks/bench_skip_merge.py times both, as `triton` and `triton-gemm`).

ZeRO-3: the op reads only the weight and bias passed in (the merge Linear's own). The model calls it from
the block's forward, not from that Linear's; DeepSpeed's ZeRO-3 registers such an access as an external
parameter of the block and gathers it (engine `_in_forward` discovery), as it would for F.linear there.

Layers: Triton kernels -> launchers -> torch.library custom ops (+ fake, + register_autograd) ->
`skip_merge`. `skip_merge_reference` is the fp32 reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from phenoflow.kernels._utils import (
    INTERPRETING,
    check_device,
    check_float,
    interpreting,
    num_sms,
    row_tile,
    to_out,
)

# ----------------------------------------------------------------------------------------------------------
# Triton kernels.


@triton.jit
def _rstd_kernel(X, S, RSTD, M, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # r = 1 / sqrt((|x|^2 + |s|^2) / 2D + eps) for BLOCK_M tokens.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(x * x, axis=1) + tl.sum(s * s, axis=1)
    tl.store(RSTD + rows, 1.0 / tl.sqrt(ss / (2 * D) + eps), mask=rmask)


@triton.jit
def _epilogue_kernel(H, RSTD, BIAS, OUT, M, D, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    # out = h * r + b (may run in place: OUT == H).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask, cmask = rows < M, cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(RSTD + rows, mask=rmask, other=0.0)
    out = h * r[:, None]
    if HAS_BIAS:
        out += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs, to_out(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_scale_kernel(DOUT, RSTD, GR, DB_PART, M, D, G, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # gr = dout * r (rows scaled) and the first stage of db = sum_tokens dout; program g loops over
    # row tiles g, g + G, ...
    g_id = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(g_id * BLOCK_M, M, G * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RSTD + rows, mask=rmask, other=0.0)
        db_acc += tl.sum(g, axis=0)
        tl.store(GR + offs, to_out(g * r[:, None], GR.dtype.element_ty), mask=mask)
    tl.store(DB_PART + g_id * D + cols, db_acc, mask=cmask)


@triton.jit
def _bwd_input_kernel(X, S, UV, RSTD, DX, DS, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # c = x.u + s.v ; dx = u - (r^2 c / 2D) x ; ds = v - (r^2 c / 2D) s ; UV rows are [u | v] (stride 2D).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    offs = r64 * D + cols[None, :]
    uoffs = r64 * (2 * D) + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UV + uoffs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(UV + uoffs + D, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(RSTD + rows, mask=rmask, other=0.0)
    c = tl.sum(x * u, axis=1) + tl.sum(s * v, axis=1)
    k = (r * r * c / (2 * D))[:, None]
    tl.store(DX + offs, to_out(u - k * x, DX.dtype.element_ty), mask=mask)
    tl.store(DS + offs, to_out(v - k * s, DS.dtype.element_ty), mask=mask)


@triton.jit
def _fused_gemm_kernel(X, S, W, BIAS, OUT, RSTD, M, D, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # The alternative forward GEMM in one kernel: acc = x @ W1^T + s @ W2^T over K = D twice (one fp32
    # accumulator), then the epilogue out = acc * r + b in registers (r from _rstd_kernel). W is (D, 2D).
    # (Summing |x|^2 from the A tiles here instead pulls them out of shared memory into registers and
    # spills at 128 x 128 tiles on sm_90, so r stays a separate one-pass kernel.)
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N)
    group = pid // (GROUP_M * n_n)  # grouped order: GROUP_M row-blocks share W tiles in L2
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Row/column indices wrapped into range (out-of-range rows compute garbage that is never stored), so
    # only K needs a mask; int32 offsets (the launcher checks M * D < 2^31) keep the pointer tiles small.
    am, bn = rm % M, rn % D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for half in tl.static_range(2):  # unrolled; 0: x with W1 = W[:, :D], 1: s with W2 = W[:, D:]
        a_ptrs = (X if half == 0 else S) + am[:, None] * D + rk[None, :]
        b_ptrs = W + bn[None, :] * (2 * D) + (half * D + rk)[:, None]
        for k in range(tl.cdiv(D, BLOCK_K)):
            left = D - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < left, other=0.0)
            if INTERPRETING:  # the interpreter's bf16 dot is wrong: multiply in fp32 there
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    r = tl.load(RSTD + rm, mask=rm < M, other=0.0)
    out = acc * r[:, None]
    if HAS_BIAS:
        out += tl.load(BIAS + rn, mask=rn < D, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm.to(tl.int64)[:, None] * D + rn[None, :], to_out(out, OUT.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < D)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers.


# Forward GEMM: "torch" (cuBLAS GEMMs + Triton rstd and epilogue, the default) or "triton" (one Triton
# kernel: GEMM, rstd and epilogue fused). bench_skip_merge.py times both; FORWARD_GEMM selects.
FORWARD_GEMM = "torch"  # "triton": the one-kernel Triton GEMM (benchmarks and tests set this attribute)


def _check(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    op = "skip_merge"
    if x.shape != s.shape or x.ndim < 2:
        raise ValueError(f"{op}: x and skip must have the same shape (..., D), got {tuple(x.shape)} and {tuple(s.shape)}")
    if x.dtype != s.dtype:
        raise TypeError(f"{op}: x ({x.dtype}) and skip ({s.dtype}) must share a dtype")
    D = x.shape[-1]
    if tuple(weight.shape) != (D, 2 * D):
        raise ValueError(f"{op}: weight must be (D, 2D) = {(D, 2 * D)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"{op}: bias must be (D,) = {(D,)}, got {tuple(bias.shape)}")
    check_float("x", x, op)
    check_float("weight", weight, op)
    check_device(x, s, weight, bias, op=op)


def skip_merge_forward(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (..., D) in x's dtype, rstd (tokens,) fp32)."""
    _check(x, s, weight, bias)
    D = x.shape[-1]
    x2, s2 = x.reshape(-1, D).contiguous(), s.reshape(-1, D).contiguous()
    M = x2.shape[0]
    w = weight.to(x.dtype)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return x.new_empty(x.shape), rstd
    BLOCK_M, BLOCK_D, warps = row_tile(M, D, live=2)  # x and s
    _rstd_kernel[(triton.cdiv(M, BLOCK_M),)](x2, s2, rstd, M, D, eps, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                                             num_warps=warps)
    if FORWARD_GEMM == "triton" and M * 2 * D < 2**31:
        out = torch.empty_like(x2)
        # 128 x 128 x 32 on 8 warps: the largest tile that compiles for sm_90 without spills (aot_check).
        BM, BN, BK = (64, 64, 32) if interpreting() else (128, 128, 32)
        grid = (triton.cdiv(M, BM) * triton.cdiv(D, BN),)
        _fused_gemm_kernel[grid](x2, s2, w, bias if bias is not None else w, out, rstd, M, D,
                                 HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=BM, BLOCK_N=BN,
                                 BLOCK_K=BK, GROUP_M=8, num_warps=8, num_stages=3)
        return out.view(x.shape), rstd
    # h = x @ W1^T + s @ W2^T: W1, W2 are column slices of W (views, leading dimension 2D; no copies).
    h = torch.mm(x2, w[:, :D].t())
    h.addmm_(s2, w[:, D:].t())  # in place: beta = 1 accumulates into the same buffer
    BLOCK_M, BLOCK_D, warps = row_tile(M, D)
    _epilogue_kernel[(triton.cdiv(M, BLOCK_M),)](h, rstd, bias if bias is not None else h, h, M, D,
                                                 HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                                                 num_warps=warps)
    return h.view(x.shape), rstd


def skip_merge_backward(dout: torch.Tensor, x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                        rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, ds, dweight, dbias) in the dtypes of x, s, weight, weight."""
    D = x.shape[-1]
    g2 = dout.reshape(-1, D).contiguous()
    x2, s2 = x.reshape(-1, D).contiguous(), s.reshape(-1, D).contiguous()
    M = x2.shape[0]
    w = weight.to(x.dtype)
    if M == 0:
        return (torch.zeros_like(x), torch.zeros_like(s), torch.zeros_like(weight),
                weight.new_zeros((D,)))
    # gr = g * r and db partial sums.
    BLOCK_M, BLOCK_D, warps = row_tile(M, D)
    G = min(triton.cdiv(M, BLOCK_M), 2 if interpreting() else 4 * num_sms(x.device))
    gr = torch.empty_like(x2)
    db_part = torch.empty((G, D), dtype=torch.float32, device=x.device)
    _bwd_scale_kernel[(G,)](g2, rstd, gr, db_part, M, D, G, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps)
    # dW = [gr^T x | gr^T s], written straight into the two halves of one (D, 2D) buffer.
    dw = torch.empty((D, 2 * D), dtype=x.dtype, device=x.device)
    torch.mm(gr.t(), x2, out=dw[:, :D])
    torch.mm(gr.t(), s2, out=dw[:, D:])
    # [u | v] = gr @ W, one GEMM; then dx, ds in one pass.
    uv = torch.mm(gr, w)
    dx, ds = torch.empty_like(x2), torch.empty_like(s2)
    BLOCK_M, BLOCK_D, warps = row_tile(M, D, live=4)  # x, s, u, v
    _bwd_input_kernel[(triton.cdiv(M, BLOCK_M),)](x2, s2, uv, rstd, dx, ds, M, D,
                                                  BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=warps)
    return (dx.view(x.shape), ds.view(s.shape), dw.to(weight.dtype), db_part.sum(0).to(weight.dtype))


# ----------------------------------------------------------------------------------------------------------
# torch.library registration.


@torch.library.custom_op("phenoflow::skip_merge_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return skip_merge_forward(x, s, weight, bias, eps)


@_fwd_op.register_fake
def _(x, s, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)


@torch.library.custom_op("phenoflow::skip_merge_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return skip_merge_backward(dout, x, s, weight, rstd)


@_bwd_op.register_fake
def _(dout, x, s, weight, rstd):
    return x.new_empty(x.shape), s.new_empty(s.shape), weight.new_empty(weight.shape), \
        weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    x, s, weight, bias, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, s, weight, output[1])
    ctx.has_bias = bias is not None


def _backward(ctx, dout, _drstd):
    x, s, weight, rstd = ctx.saved_tensors
    dx, ds, dw, db = _bwd_op(dout, x, s, weight, rstd)
    return dx, ds, dw, (db if ctx.has_bias else None), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def skip_merge(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Linear(2D -> D)(rmsnorm(cat([x, skip], -1))) fused; x, skip (..., D), weight (D, 2D), bias (D,).

    Under torch.autocast the inputs are cast to the autocast dtype first, as F.linear's autocast rule does
    (so the GEMMs run in bf16 and the output dtype matches the eager path's).
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, skip, weight = x.to(dt), skip.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return _fwd_op(x, skip, weight, bias, eps)[0]


# ----------------------------------------------------------------------------------------------------------
# fp32 reference.


def skip_merge_reference(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         eps: float = 1e-6) -> torch.Tensor:
    """fp32: Linear(rmsnorm(cat([x, skip]))) the direct way (the concatenation materialised)."""
    h = torch.cat([x.float(), skip.float()], dim=-1)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return torch.nn.functional.linear(h, weight.float(), None if bias is None else bias.float())
